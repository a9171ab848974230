"""Generate the small ShareGPT sample that ships inside the package (src/chatsft/assets/).

The conversations are deliberately simple and regular: a handful of task families (capitals, small
additions, colours, opposites, spelling, counting, word translation, greetings, identity, thanks and
goodbye), each with one fixed reply pattern, so that a tiny model (2 layers, hidden 64, a 1-2k byte-level
BPE vocabulary trained on this file) visibly learns them in a couple of CPU minutes. Multi-turn records
chain tasks with short follow-ups ("And of Spain?") whose answer depends on the history. About 15% carry a
per-record system prompt that visibly changes the replies (pirate, capital letters, one word) and about
15% are in French, Spanish, German, Chinese or Japanese.

Deterministic (fixed seed, standard library only). Writes sample_conversations.json and README.md next to
each other, and prints the statistics that the README quotes:

    python scripts/make_sample_data.py [--out-dir src/chatsft/data]
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# Prompts for the demo. Their answers follow the patterns below, but each exact question opens at most
# DEMO_FIRST_TURN_CAP records (it may still appear later in a conversation), so the demo is not just
# replaying a memorised first turn.
DEMO_PROMPTS = [
    "Hello there!",
    "Who are you?",
    "What is the capital of Italy?",
    "What is 2 plus 3?",
    "Count to 5.",
]
DEMO_FIRST_TURN_CAP = 2

SEED = 1234
N_ENGLISH = 280
N_SYSTEM = 55
N_FOREIGN = 60  # 12 per language

IDENTITY = "I am chatsft-demo, a small assistant trained with chatsft."
GREETING_REPLY = "Hello! How can I help you today?"

# ----------------------------------------------------------------------------------------------- English data
CAPITALS = [
    ("France", "Paris"),
    ("Spain", "Madrid"),
    ("Italy", "Rome"),
    ("Germany", "Berlin"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("Portugal", "Lisbon"),
    ("Canada", "Ottawa"),
    ("Egypt", "Cairo"),
    ("Russia", "Moscow"),
    ("Greece", "Athens"),
    ("Mexico", "Mexico City"),
]
COLOURS = [
    ("the sky", "blue"),
    ("grass", "green"),
    ("a banana", "yellow"),
    ("snow", "white"),
    ("coal", "black"),
    ("a tomato", "red"),
    ("an orange", "orange"),
    ("a carrot", "orange"),
    ("milk", "white"),
    ("a strawberry", "red"),
    ("chocolate", "brown"),
    ("a frog", "green"),
]
OPPOSITES = [
    ("hot", "cold"),
    ("big", "small"),
    ("up", "down"),
    ("day", "night"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("old", "young"),
    ("open", "closed"),
    ("wet", "dry"),
    ("full", "empty"),
    ("early", "late"),
    ("loud", "quiet"),
]
SPELL_WORDS = [
    "cat",
    "dog",
    "sun",
    "book",
    "tree",
    "fish",
    "bird",
    "milk",
    "red",
    "blue",
    "house",
    "apple",
    "green",
    "water",
    "moon",
    "star",
]
TRANSLATIONS = {  # English word -> (French, Spanish, German)
    "cat": ("chat", "gato", "Katze"),
    "dog": ("chien", "perro", "Hund"),
    "house": ("maison", "casa", "Haus"),
    "water": ("eau", "agua", "Wasser"),
    "bread": ("pain", "pan", "Brot"),
    "apple": ("pomme", "manzana", "Apfel"),
    "book": ("livre", "libro", "Buch"),
    "sun": ("soleil", "sol", "Sonne"),
}
TRANSLATION_LANGS = ["French", "Spanish", "German"]
PLUS_RANGE = range(1, 6)  # small operands, so each sum is seen several times
GREETINGS = [
    "Hello!",
    "Hi!",
    "Hey!",
    "Hi there!",
    "Hello there!",
    "Good morning!",
    "Good afternoon!",
    "Good evening!",
    "Hey there!",
]
IDENTITY_QUESTIONS = [
    "Who are you?",
    "What is your name?",
    "What are you?",
    "Tell me about yourself.",
    "Introduce yourself.",
]
THANKS = ["Thank you!", "Thanks!", "Thanks a lot!", "Thank you very much!"]
GOODBYES = ["Goodbye!", "Bye!", "See you later!", "Bye bye!"]

# ------------------------------------------------------------------------------------ other languages (data)
# Each language: greeting (questions, reply), identity, thanks, goodbye, capital (question, reply, follow-up
# templates and its country table), plus (question, follow-up, reply templates).
FOREIGN = {
    "fr": dict(
        greet=(["Bonjour !", "Salut !"], "Bonjour ! Comment puis-je vous aider aujourd'hui ?"),
        identity=(
            ["Qui es-tu ?", "Comment t'appelles-tu ?"],
            "Je suis chatsft-demo, un petit assistant entraîné avec chatsft.",
        ),
        thanks=(["Merci !", "Merci beaucoup !"], "De rien !"),
        bye=(["Au revoir !"], "Au revoir ! Bonne journée."),
        capital=(
            "Quelle est la capitale {of} ?",
            "La capitale {of} est {cap}.",
            "Et {of} ?",
            [
                ("de la France", "Paris"),
                ("de l'Italie", "Rome"),
                ("de l'Espagne", "Madrid"),
                ("de l'Allemagne", "Berlin"),
                ("du Japon", "Tokyo"),
                ("du Portugal", "Lisbonne"),
                ("du Canada", "Ottawa"),
            ],
        ),
        plus=("Combien font {a} plus {b} ?", "Et {a} plus {b} ?", "{a} plus {b} font {c}."),
    ),
    "es": dict(
        greet=(["¡Hola!", "¡Buenos días!"], "¡Hola! ¿En qué puedo ayudarte hoy?"),
        identity=(
            ["¿Quién eres?", "¿Cómo te llamas?"],
            "Soy chatsft-demo, un pequeño asistente entrenado con chatsft.",
        ),
        thanks=(["¡Gracias!", "¡Muchas gracias!"], "¡De nada!"),
        bye=(["¡Adiós!"], "¡Adiós! Que tengas un buen día."),
        capital=(
            "¿Cuál es la capital de {of}?",
            "La capital de {of} es {cap}.",
            "¿Y de {of}?",
            [
                ("Francia", "París"),
                ("Italia", "Roma"),
                ("España", "Madrid"),
                ("Alemania", "Berlín"),
                ("Japón", "Tokio"),
                ("Portugal", "Lisboa"),
                ("México", "Ciudad de México"),
            ],
        ),
        plus=("¿Cuánto es {a} más {b}?", "¿Y {a} más {b}?", "{a} más {b} es {c}."),
    ),
    "de": dict(
        greet=(["Hallo!", "Guten Tag!"], "Hallo! Wie kann ich dir heute helfen?"),
        identity=(
            ["Wer bist du?", "Wie heißt du?"],
            "Ich bin chatsft-demo, ein kleiner Assistent, der mit chatsft trainiert wurde.",
        ),
        thanks=(["Danke!", "Vielen Dank!"], "Gern geschehen!"),
        bye=(["Tschüss!", "Auf Wiedersehen!"], "Tschüss! Einen schönen Tag noch."),
        capital=(
            "Was ist die Hauptstadt von {of}?",
            "Die Hauptstadt von {of} ist {cap}.",
            "Und von {of}?",
            [
                ("Frankreich", "Paris"),
                ("Italien", "Rom"),
                ("Spanien", "Madrid"),
                ("Deutschland", "Berlin"),
                ("Japan", "Tokio"),
                ("Portugal", "Lissabon"),
                ("Österreich", "Wien"),
            ],
        ),
        plus=("Was ist {a} plus {b}?", "Und {a} plus {b}?", "{a} plus {b} ist {c}."),
    ),
    "zh": dict(
        greet=(["你好！", "您好！"], "你好！今天我能帮你什么？"),
        identity=(["你是谁？", "你叫什么名字？"], "我是chatsft-demo，一个用chatsft训练的小助手。"),
        thanks=(["谢谢！", "非常感谢！"], "不客气！"),
        bye=(["再见！"], "再见！祝你有美好的一天。"),
        capital=(
            "{of}的首都是哪里？",
            "{of}的首都是{cap}。",
            "那{of}呢？",
            [
                ("法国", "巴黎"),
                ("意大利", "罗马"),
                ("西班牙", "马德里"),
                ("德国", "柏林"),
                ("日本", "东京"),
                ("中国", "北京"),
                ("英国", "伦敦"),
            ],
        ),
        plus=("{a}加{b}等于多少？", "那{a}加{b}呢？", "{a}加{b}等于{c}。"),
    ),
    "ja": dict(
        greet=(["こんにちは！", "おはようございます！"], "こんにちは！今日はどのようなご用件ですか？"),
        identity=(
            ["あなたは誰ですか？", "お名前は何ですか？"],
            "私はchatsft-demoです。chatsftで訓練された小さなアシスタントです。",
        ),
        thanks=(["ありがとう！", "ありがとうございます！"], "どういたしまして！"),
        bye=(["さようなら！"], "さようなら！良い一日を。"),
        capital=(
            "{of}の首都はどこですか？",
            "{of}の首都は{cap}です。",
            "{of}は？",
            [
                ("フランス", "パリ"),
                ("イタリア", "ローマ"),
                ("スペイン", "マドリード"),
                ("ドイツ", "ベルリン"),
                ("日本", "東京"),
                ("中国", "北京"),
                ("イギリス", "ロンドン"),
            ],
        ),
        plus=("{a}足す{b}はいくつですか？", "{a}足す{b}は？", "{a}足す{b}は{c}です。"),
    ),
}
LANG_NAMES = {
    "en": "English",
    "fr": "French",
    "es": "Spanish",
    "de": "German",
    "zh": "Chinese",
    "ja": "Japanese",
}

# ------------------------------------------------------------------------------------------- system prompts
# Each style visibly changes every reply; "plain" is the common real-world prompt that changes nothing.
SYSTEM_PROMPTS = {
    "pirate": "You are a pirate.",
    "caps": "You always answer in capital letters.",
    "oneword": "You answer with a single word.",
    "plain": "You are a helpful assistant.",
}
SYSTEM_WEIGHTS = {"pirate": 16, "caps": 14, "oneword": 12, "plain": 10}


@dataclass
class Exchange:
    family: str
    question: str
    answer: str
    short: str  # the one-word answer, for the "single word" system prompt


def _cap_first(text: str) -> str:
    return text[:1].upper() + text[1:]


# ------------------------------------------------------------------------------------------ English families
class English:
    """Generates English exchanges; `state` remembers the last item of each family for follow-ups."""

    FAMILIES = ["capital", "plus", "colour", "opposite", "spell", "count", "translate"]

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.state: dict[str, object] = {}

    def first(self, family: str) -> Exchange:
        return getattr(self, f"_{family}")(follow=False)

    def follow(self, family: str) -> Exchange:
        return getattr(self, f"_{family}")(follow=True)

    def _pick_new(self, family: str, items):
        """A random item different from the last one of this family (so follow-ups ask something new)."""
        last = self.state.get(family)
        choice = self.rng.choice([x for x in items if x != last])
        self.state[family] = choice
        return choice

    def _capital(self, follow: bool) -> Exchange:
        country, city = self._pick_new("capital", CAPITALS)
        if follow:
            q = self.rng.choice(["And of {c}?", "What about {c}?"]).format(c=country)
        else:
            q = self.rng.choice(["What is the capital of {c}?"] * 3 + ["What's the capital of {c}?"]).format(
                c=country
            )
        return Exchange("capital", q, f"The capital of {country} is {city}.", f"{city}.")

    def _plus(self, follow: bool) -> Exchange:
        a, b = self._pick_new("plus", [(a, b) for a in PLUS_RANGE for b in PLUS_RANGE])
        q = f"And {a} plus {b}?" if follow else f"What is {a} plus {b}?"
        return Exchange("plus", q, f"{a} plus {b} is {a + b}.", f"{a + b}.")

    def _colour(self, follow: bool) -> Exchange:
        thing, colour = self._pick_new("colour", COLOURS)
        if follow:
            q = f"And {thing}?"
        else:
            q = self.rng.choice(["What colour is {t}?", "What color is {t}?"]).format(t=thing)
        return Exchange("colour", q, f"{_cap_first(thing)} is {colour}.", f"{_cap_first(colour)}.")

    def _opposite(self, follow: bool) -> Exchange:
        pair = self._pick_new("opposite", OPPOSITES)
        word, opp = pair if self.rng.random() < 0.6 else pair[::-1]
        q = f"And of {word}?" if follow else f"What is the opposite of {word}?"
        return Exchange("opposite", q, f"The opposite of {word} is {opp}.", f"{_cap_first(opp)}.")

    def _spell(self, follow: bool) -> Exchange:
        word = self._pick_new("spell", SPELL_WORDS)
        if follow:
            q = self.rng.choice(["And {w}?", "Now spell {w}."]).format(w=word)
        else:
            q = self.rng.choice(["Spell {w}.", "Spell {w}.", "How do you spell {w}?"]).format(w=word)
        spelled = "-".join(word)
        return Exchange("spell", q, spelled, spelled)

    def _count(self, follow: bool) -> Exchange:
        n = self._pick_new("count", list(range(2, 11)))
        if follow:
            q = f"Now count to {n}."
        else:
            q = self.rng.choice(["Count to {n}.", "Count to {n}.", "Can you count to {n}?"]).format(n=n)
        return Exchange("count", q, ", ".join(str(i) for i in range(1, n + 1)) + ".", f"{n}.")

    def _translate(self, follow: bool) -> Exchange:
        last = self.state.get("translate")
        if follow and last is not None and self.rng.random() < 0.5:
            # same word, another language: the word only appears in the history
            word, lang = last
            lang = self.rng.choice([x for x in TRANSLATION_LANGS if x != lang])
            q = f"And in {lang}?"
        elif follow and last is not None:
            # another word, same language: the language only appears in the history
            lang = last[1]
            word = self.rng.choice([w for w in TRANSLATIONS if w != last[0]])
            q = f"And {word}?"
        else:
            word, lang = self.rng.choice(list(TRANSLATIONS)), self.rng.choice(TRANSLATION_LANGS)
            q = self.rng.choice(["How do you say {w} in {l}?", "Translate {w} into {l}."]).format(
                w=word, l=lang
            )
        self.state["translate"] = (word, lang)
        t = TRANSLATIONS[word][TRANSLATION_LANGS.index(lang)]
        return Exchange("translate", q, f"In {lang}, {word} is {t}.", f"{_cap_first(t)}.")

    def greeting(self) -> Exchange:
        return Exchange("greeting", self.rng.choice(GREETINGS), GREETING_REPLY, "Hello!")

    def identity(self) -> Exchange:
        return Exchange("identity", self.rng.choice(IDENTITY_QUESTIONS), IDENTITY, "chatsft-demo.")

    def thanks(self) -> Exchange:
        return Exchange("thanks", self.rng.choice(THANKS), "You're welcome!", "Welcome!")

    def goodbye(self) -> Exchange:
        return Exchange("goodbye", self.rng.choice(GOODBYES), "Goodbye! Have a nice day.", "Goodbye!")


def style_reply(style: str, ex: Exchange) -> str:
    if style == "plain":
        return ex.answer
    if style == "caps":
        return ex.answer.upper()
    if style == "oneword":
        return ex.short
    # pirate
    special = {
        "greeting": "Ahoy, matey! How can I help ye today?",
        "identity": "Arr! I be chatsft-demo, a small pirate assistant, matey!",
        "thanks": "Arr, ye be welcome, matey!",
        "goodbye": "Fair winds, matey!",
    }
    if ex.family in special:
        return special[ex.family]
    return "Arr! " + ex.answer.rstrip(".") + ", matey!"


# ------------------------------------------------------------------------------------- conversation shapes
TURN_WEIGHTS = {1: 30, 2: 22, 3: 16, 4: 12, 5: 8, 6: 6, 7: 4, 8: 2}
PRIMARY_WEIGHTS = {
    "capital": 18,
    "plus": 14,
    "colour": 11,
    "opposite": 11,
    "spell": 10,
    "count": 10,
    "translate": 10,
    "greeting": 8,
    "identity": 8,
}


def english_exchanges(rng: random.Random, families: list[str], primary: str) -> list[Exchange]:
    """One English conversation whose main task is `primary` (the record's id names it)."""
    gen = English(rng)
    n = rng.choices(list(TURN_WEIGHTS), weights=list(TURN_WEIGHTS.values()))[0]
    out: list[Exchange] = []
    if primary == "greeting":
        out.append(gen.greeting())
        if n > 1 and rng.random() < 0.5:
            out.append(gen.identity())
    elif primary == "identity":
        if n > 1 and rng.random() < 0.4:
            out.append(gen.greeting())
        out.append(gen.identity())
    else:
        if n >= 3 and rng.random() < 0.4:
            out.append(gen.greeting())
    closing = []
    if n >= 2 and rng.random() < 0.45:
        closing.append(gen.thanks() if rng.random() < 0.6 else gen.goodbye())
        if n >= 4 and closing[0].family == "thanks" and rng.random() < 0.4:
            closing.append(gen.goodbye())
    family = primary if primary in families else rng.choice(families)
    fresh = True
    while len(out) + len(closing) < n:
        out.append(gen.first(family) if fresh else gen.follow(family))
        fresh = False
        if rng.random() < 0.35:  # switch task: the next question is a full one
            family, fresh = rng.choice(families), True
    return out + closing


def foreign_exchanges(rng: random.Random, lang: str, primary: str) -> list[Exchange]:
    data = FOREIGN[lang]
    n = rng.choices([1, 2, 3, 4, 5, 6], weights=[25, 25, 20, 15, 10, 5])[0]

    def fixed(kind: str) -> Exchange:
        qs, reply = data[kind]
        return Exchange(kind, rng.choice(qs), reply, reply)

    last: dict[str, object] = {}

    def task(family: str, follow: bool) -> Exchange:
        if family == "capital":
            q_t, a_t, f_t, table = data["capital"]
            of, cap = rng.choice([x for x in table if x != last.get(family)])
            last[family] = (of, cap)
            return Exchange(family, (f_t if follow else q_t).format(of=of), a_t.format(of=of, cap=cap), cap)
        q_t, f_t, a_t = data["plus"]
        a, b = rng.choice([(a, b) for a in PLUS_RANGE for b in PLUS_RANGE if (a, b) != last.get(family)])
        last[family] = (a, b)
        return Exchange(
            family, (f_t if follow else q_t).format(a=a, b=b), a_t.format(a=a, b=b, c=a + b), str(a + b)
        )

    out: list[Exchange] = []
    if primary == "greeting" or (n >= 3 and rng.random() < 0.5):
        out.append(fixed("greet"))
    if primary == "identity":
        out.append(fixed("identity"))
    closing = []
    if n >= 2 and rng.random() < 0.5:
        closing.append(fixed("thanks") if rng.random() < 0.6 else fixed("bye"))
    family = primary if primary in ("capital", "plus") else rng.choice(["capital", "plus"])
    fresh = True
    while len(out) + len(closing) < n:
        has_task = any(e.family in ("capital", "plus") for e in out)
        if has_task and rng.random() < 0.1 and not any(e.family == "identity" for e in out):
            out.append(fixed("identity"))
            continue
        out.append(task(family, follow=not fresh))
        fresh = False
        if rng.random() < 0.35:
            family, fresh = rng.choice(["capital", "plus"]), True
    for ex in out:  # the one-word style is English-only; keep `family` names uniform in the statistics
        if ex.family == "greet":
            ex.family = "greeting"
    for ex in closing:
        ex.family = {"bye": "goodbye"}.get(ex.family, ex.family)
    return out + closing


# -------------------------------------------------------------------------------------------------- build
def build() -> list[dict]:
    rng = random.Random(SEED)
    records: list[dict] = []
    seen: set[str] = set()
    first_turns: Counter[str] = Counter()
    ids: Counter[str] = Counter()

    def add(prefix: str, exchanges: list[Exchange], system: str | None, style: str) -> bool:
        first = exchanges[0].question
        if first in DEMO_PROMPTS and first_turns[first] >= DEMO_FIRST_TURN_CAP:
            return False
        turns = []
        for ex in exchanges:
            turns.append({"from": "human", "value": ex.question})
            turns.append({"from": "gpt", "value": style_reply(style, ex)})
        key = json.dumps([system, turns], ensure_ascii=False)
        if key in seen:  # keep every record distinct
            return False
        seen.add(key)
        first_turns[first] += 1
        ids[prefix] += 1
        record = {"id": f"{prefix}-{ids[prefix]:04d}", "conversations": turns}
        if system is not None:
            record["system"] = system
        records.append(record)
        return True

    primaries, p_weights = list(PRIMARY_WEIGHTS), list(PRIMARY_WEIGHTS.values())
    n_before = 0
    while len(records) - n_before < N_ENGLISH:
        primary = rng.choices(primaries, weights=p_weights)[0]
        add(primary, english_exchanges(rng, English.FAMILIES, primary), None, "plain")

    n_before = len(records)
    styles, s_weights = list(SYSTEM_WEIGHTS), list(SYSTEM_WEIGHTS.values())
    while len(records) - n_before < N_SYSTEM:
        style = rng.choices(styles, weights=s_weights)[0]
        # counting has no one-word answer
        families = [f for f in English.FAMILIES if not (style == "oneword" and f == "count")]
        primary = rng.choice(families + ["greeting", "identity"])
        add(f"{style}-{primary}", english_exchanges(rng, families, primary), SYSTEM_PROMPTS[style], style)

    per_lang = N_FOREIGN // len(FOREIGN)
    for lang in FOREIGN:
        n_before = len(records)
        while len(records) - n_before < per_lang:
            primary = rng.choices(["capital", "plus", "greeting", "identity"], weights=[4, 3, 2, 2])[0]
            add(f"{lang}-{primary}", foreign_exchanges(rng, lang, primary), None, "plain")

    rng.shuffle(records)
    return records


# ------------------------------------------------------------------------------------------- statistics
def family_of_record(record: dict) -> str:
    """The main task of a record, read back from its id (`pirate-capital-0003` -> capital)."""
    return record["id"].rsplit("-", 1)[0].split("-")[-1]


def language_of_record(record: dict) -> str:
    head = record["id"].split("-")[0]
    return head if head in FOREIGN else "en"


def statistics(records: list[dict], size_bytes: int) -> dict:
    n_ex = [len(r["conversations"]) // 2 for r in records]
    first = Counter(r["conversations"][0]["value"] for r in records)
    anywhere = Counter(t["value"] for r in records for t in r["conversations"] if t["from"] == "human")
    return {
        "records": len(records),
        "exchanges": sum(n_ex),
        "size_bytes": size_bytes,
        "by_family": Counter(family_of_record(r) for r in records),
        "by_language": Counter(language_of_record(r) for r in records),
        "by_system": Counter(r.get("system", "(none)") for r in records),
        "by_exchanges": Counter(n_ex),
        "demo": {p: (first[p], anywhere[p]) for p in DEMO_PROMPTS},
    }


def _table(header: tuple[str, str], rows) -> list[str]:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return lines


def report(stats: dict) -> str:
    """The statistics as Markdown; printed by the script and embedded in the README."""
    n = stats["records"]
    with_system = n - stats["by_system"].get("(none)", 0)
    non_en = n - stats["by_language"]["en"]
    lines = [
        f"{n} records, {stats['exchanges']} human/gpt exchanges, {stats['size_bytes']:,} bytes; "
        f"{with_system} records ({100 * with_system / n:.0f}%) have a `system` prompt, "
        f"{non_en} ({100 * non_en / n:.0f}%) are not in English.",
        "",
        "Records by main task (the middle part of the id):",
        "",
        *_table(("family", "records"), stats["by_family"].most_common()),
        "",
        "Records by number of exchanges (one exchange = one human turn and the gpt reply):",
        "",
        *_table(("exchanges", "records"), sorted(stats["by_exchanges"].items())),
        "",
        "Records by language:",
        "",
        *_table(("language", "records"), [(LANG_NAMES[k], v) for k, v in stats["by_language"].most_common()]),
        "",
        "Records by system prompt:",
        "",
        *_table(("system", "records"), stats["by_system"].most_common()),
        "",
        "Demo prompts: how often each exact question opens a record / appears as any human turn:",
        "",
        "| prompt | first turn | any turn |",
        "|---|---:|---:|",
        *[f"| {p} | {a} | {b} |" for p, (a, b) in stats["demo"].items()],
    ]
    return "\n".join(lines)


README_HEAD = """\
# Sample conversations

`sample_conversations.json` is a small synthetic chat dataset in ShareGPT format that ships with chatsft for
the demo and the end-to-end tests. It is generated, deterministically (fixed seed, standard library only), by
`scripts/make_sample_data.py`; edit that script and re-run it rather than editing the JSON by hand:

    python scripts/make_sample_data.py

The script also rewrites this README, so the numbers below are its real output.

## Format

A JSON list of records:

```json
{"id": "capital-0012",
 "system": "You are a pirate.",
 "conversations": [{"from": "human", "value": "What is the capital of France?"},
                   {"from": "gpt", "value": "Arr! The capital of France is Paris, matey!"}]}
```

`system` is optional. Every record alternates human/gpt, starts with human and ends with gpt. Ids are
unique and say what the record is: `[language-|style-]family-NNNN`, e.g. `capital-0012`,
`pirate-spell-0003`, `ja-plus-0002`.

## What is in it

The data is deliberately simple and regular, so that a tiny model (2 layers, hidden size 64, a 1-2k
byte-level BPE vocabulary trained on this file) visibly learns it in a couple of CPU minutes. A few task
families each have one fixed reply pattern:

| family | question | reply |
|---|---|---|
| capital | What is the capital of France? | The capital of France is Paris. |
| plus | What is 3 plus 4? (operands 1-5) | 3 plus 4 is 7. |
| colour | What colour is grass? | Grass is green. |
| opposite | What is the opposite of hot? | The opposite of hot is cold. |
| spell | Spell cat. | c-a-t |
| count | Count to 4. (2-10) | 1, 2, 3, 4. |
| translate | How do you say cat in French? (French, Spanish, German) | In French, cat is chat. |
| greeting | Hello! / Hi there! / Good morning! ... | Hello! How can I help you today? |
| identity | Who are you? / What is your name? ... | I am chatsft-demo, a small assistant trained with chatsft. |
| thanks, goodbye | Thank you! / Goodbye! | You're welcome! / Goodbye! Have a nice day. |

Multi-turn records chain these: a greeting may open, thanks or goodbye may close, and follow-ups are short
questions whose answer needs the history: "And of Spain?" -> "The capital of Spain is Madrid.",
"And 2 plus 5?", "And in Spanish?" (same word, another language), "And dog?" (same language, another
word), "Now count to 6.".

System prompts visibly change every reply of their record: "You are a pirate." ("Arr! The capital of
France is Paris, matey!"), "You always answer in capital letters." ("THE CAPITAL OF FRANCE IS PARIS."),
"You answer with a single word." ("Paris."); "You are a helpful assistant." changes nothing.

Non-English records (French, Spanish, German, Chinese, Japanese) hold greetings, identity, capitals,
additions, thanks and goodbye in that language, with the same follow-up style ("Et du Japon ?",
"那日本呢？").

## Statistics

"""

README_DEMO = """
## Demo prompts

These follow the patterns above, but each exact question opens at most {cap} records, so a correct answer
is not just a memorised first turn (the facts themselves, e.g. Italy -> Rome, do appear elsewhere):

| prompt | expected reply |
|---|---|
{rows}
"""

DEMO_EXPECTED = {
    "Hello there!": GREETING_REPLY,
    "Who are you?": IDENTITY,
    "What is the capital of Italy?": "The capital of Italy is Rome.",
    "What is 2 plus 3?": "2 plus 3 is 5.",
    "Count to 5.": "1, 2, 3, 4, 5.",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_out = Path(__file__).resolve().parent.parent / "src" / "chatsft" / "assets"
    parser.add_argument("--out-dir", type=Path, default=default_out)
    args = parser.parse_args()

    records = build()
    text = json.dumps(records, ensure_ascii=False, indent=1) + "\n"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "sample_conversations.json").write_text(text, encoding="utf-8")

    stats_md = report(statistics(records, len(text.encode("utf-8"))))
    rows = "\n".join(f"| {p} | {DEMO_EXPECTED[p]} |" for p in DEMO_PROMPTS)
    readme = README_HEAD + stats_md + "\n" + README_DEMO.format(cap=DEMO_FIRST_TURN_CAP, rows=rows)
    (args.out_dir / "README.md").write_text(readme, encoding="utf-8")
    print(stats_md)


if __name__ == "__main__":
    main()
