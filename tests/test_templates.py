"""Templates: golden strings for every table format, the exported Jinja chat_template against transformers
(add_generation_prompt honoured, through a saved tokenizer), every built-in against its family's real template
(the golden tests), records a template cannot write refused, and `get_template`'s choice of kind (the rule for
any Jinja template is tested in test_jinja_templates)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import chatsft
from chatsft.encode import Encoder
from chatsft.errors import ConfigError
from chatsft.jinja_templates import JinjaTemplate
from chatsft.records import Conversation
from chatsft.templates import (
    BUILTINS,
    RenderError,
    Segment,
    Template,
    get_template,
    render,
    render_text,
)

QA = [
    {"role": "user", "content": "q1"},
    {"role": "assistant", "content": "a1"},
    {"role": "user", "content": "q2"},
    {"role": "assistant", "content": "a2"},
]
SQA = [{"role": "system", "content": "SYS"}, *QA]
TABLE = {name: t for name, t in BUILTINS.items() if isinstance(t, Template)}  # the table formats
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)

GOLDEN = {
    "vicuna_v1.1": (
        f"<s>{VICUNA_SYSTEM} USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>",
        "<s>SYS USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>",
    ),
    "baichuan-chat": (
        "<reserved_102>q1<reserved_103>a1</s><reserved_102>q2<reserved_103>a2</s>",
        "SYS<reserved_102>q1<reserved_103>a1</s><reserved_102>q2<reserved_103>a2</s>",
    ),
    "baichuan2-chat": (
        "<reserved_106>q1<reserved_107>a1</s><reserved_106>q2<reserved_107>a2</s>",
        "SYS<reserved_106>q1<reserved_107>a1</s><reserved_106>q2<reserved_107>a2</s>",
    ),
    "llama-2": (
        "<s>[INST] q1 [/INST] a1 </s><s>[INST] q2 [/INST] a2 </s>",
        "<s>[INST] <<SYS>>\nSYS\n<</SYS>>\n\nq1 [/INST] a1 </s><s>[INST] q2 [/INST] a2 </s>",
    ),
    "mistral": (
        "<s> [INST] q1 [/INST] a1</s> [INST] q2 [/INST] a2</s>",
        "<s> [INST] SYS\n\nq1 [/INST] a1</s> [INST] q2 [/INST] a2</s>",
    ),
    "chatml": (
        "<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n"
        "<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\na2<|im_end|>\n",
        "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n"
        "<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\na2<|im_end|>\n",
    ),
    "yuan2": ("q1<n>a1<n>q2<n>a2<eod>", "SYS\nq1<n>a1<n>q2<n>a2<eod>"),
}
# The prompt the model sees before generating the second reply (add_generation_prompt=True on QA[:3]).
GOLDEN_PROMPT = {
    "vicuna_v1.1": f"<s>{VICUNA_SYSTEM} USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT:",
    "baichuan-chat": "<reserved_102>q1<reserved_103>a1</s><reserved_102>q2<reserved_103>",
    "baichuan2-chat": "<reserved_106>q1<reserved_107>a1</s><reserved_106>q2<reserved_107>",
    "llama-2": "<s>[INST] q1 [/INST] a1 </s><s>[INST] q2 [/INST]",
    "mistral": "<s> [INST] q1 [/INST] a1</s> [INST] q2 [/INST]",
    "chatml": GOLDEN["chatml"][0][: -len("a2<|im_end|>\n")],
    "yuan2": "q1<n>a1<n>q2<sep>",
}


@pytest.fixture(scope="module")
def tok(bpe_all_markers):
    return bpe_all_markers


def test_every_family_has_a_golden_string():
    assert set(GOLDEN) == set(TABLE) == set(GOLDEN_PROMPT)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_golden_strings(name):
    plain, with_system = GOLDEN[name]
    assert render_text(BUILTINS[name], QA) == plain
    assert render_text(BUILTINS[name], SQA) == with_system
    assert render_text(BUILTINS[name], QA[:3], add_generation_prompt=True) == GOLDEN_PROMPT[name]


@pytest.mark.parametrize("name", sorted(TABLE))
def test_trainable_segments_are_reply_plus_end_marker(name):
    segments = render(BUILTINS[name], SQA)
    by_turn = {t: "".join(s.text for s in segments if s.trainable and s.turn == t) for t in (2, 4)}
    end = {"chatml": "<|im_end|>", "llama-2": " </s>"}.get(name, "</s>")
    lead = " " if name in ("vicuna_v1.1", "llama-2", "mistral") else ""
    if name == "yuan2":
        assert by_turn == {2: "a1<n>", 4: "a2<eod>"}  # FastChat's efficient_loss trains the '<n>' after a1
    else:
        assert by_turn == {2: f"{lead}a1{end}", 4: f"{lead}a2{end}"}
    assert all(s.content == (s.text in ("SYS", "q1", "a1", "q2", "a2")) for s in segments)
    assert all(not s.trainable for s in segments if s.turn in (0, 1, 3))


def test_yuan2_loss_mode_renderings():
    yuan2 = BUILTINS["yuan2"]
    assert render_text(yuan2, QA) == "q1<n>a1<n>q2<n>a2<eod>"  # all replies (efficient_loss)
    assert render_text(yuan2, QA, {3}) == "q1<n>a1<n>q2<sep>a2<eod>"  # last reply (last_response_loss)
    assert render_text(yuan2, QA[:2], {1}) == "q1<sep>a1<eod>"  # split_example_loss, first example
    trained = [s.text for s in render(yuan2, QA, {3}) if s.trainable]
    assert trained == ["a2", "<eod>"]
    # no rstrip('<n>') bug: trailing '<', 'n', '>' characters of messages survive
    odd = [{"role": "user", "content": "1 < n"}, {"role": "assistant", "content": "<n>n>"}]
    assert render_text(yuan2, odd, {1}) == "1 < n<sep><n>n><eod>"


def test_vicuna_system_replaces_default_and_empty_system_means_none():
    assert render_text(BUILTINS["vicuna_v1.1"], SQA, bos=None).startswith("SYS USER: q1")
    empty = [{"role": "system", "content": ""}, *QA]
    assert (
        render_text(BUILTINS["vicuna_v1.1"], empty, bos="")
        == "USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>"
    )


def test_bad_roles_are_rejected():
    with pytest.raises(RenderError) as err:
        render(BUILTINS["chatml"], [QA[1], QA[0]])
    assert err.value.reason == "bad_roles"
    with pytest.raises(RenderError):
        render(BUILTINS["chatml"], QA, add_generation_prompt=True)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_exported_jinja_matches_render_through_transformers(tok, name):
    """tokenizer.apply_chat_template with template.jinja() renders exactly what we train on, and the inference
    prompt with add_generation_prompt=True."""
    template = BUILTINS[name]
    tok.chat_template = template.jinja()
    try:
        for messages in (
            QA,
            SQA,
            QA[:2],
            [
                {"role": "user", "content": "it's \\n {{ x }} {% y %} 'q'"},
                {"role": "assistant", "content": "\n a \t"},
            ],
        ):
            expected = render_text(template, messages, bos=tok.bos_token, eos=tok.eos_token)
            assert tok.apply_chat_template(messages, tokenize=False) == expected
        for messages in (QA[:3], SQA[:4], QA[:1]):
            expected = render_text(
                template, messages, bos=tok.bos_token, eos=tok.eos_token, add_generation_prompt=True
            )
            assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
    finally:
        tok.chat_template = None


def test_get_template_auto_tokenizer_and_errors(tok):
    assert get_template("auto", tok)[0].name == "vicuna_v1.1"
    assert "no chat_template" in get_template("auto", tok)[1]
    assert get_template("chatml", tok)[0] is BUILTINS["chatml"]
    with pytest.raises(ConfigError, match="no chat_template"):
        get_template("tokenizer", tok)
    with pytest.raises(ConfigError, match="unknown --conv_template"):
        get_template("vicuna", tok)
    tok.chat_template = BUILTINS["chatml"].jinja()
    try:
        template, notice = get_template("auto", tok)
        assert isinstance(template, JinjaTemplate) and not isinstance(template, Template)
        assert template.name == "tokenizer" and "own chat_template" in notice
        assert template.jinja() == BUILTINS["chatml"].jinja() and template.stop == ("<|im_end|>", "</s>")
    finally:
        tok.chat_template = None


def test_segments_are_frozen_and_templates_module_imports_no_torch():
    with pytest.raises(AttributeError):
        Segment("a", True, False, 0).text = "b"
    code = (
        "import sys, chatsft.templates, chatsft.jinja_templates; "
        "sys.exit(bool({'torch', 'transformers'} & set(sys.modules)))"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---- the exported Jinja honours add_generation_prompt (through a saved tokenizer) ----


@pytest.fixture(scope="module")
def saved_dirs(tok, tmp_path_factory):
    """One saved tokenizer folder per built-in, its chat_template being the built-in's exported Jinja."""
    out = {}
    for name, template in BUILTINS.items():
        tok.chat_template = template.jinja()
        out[name] = tmp_path_factory.mktemp("saved") / name
        tok.save_pretrained(out[name])
    tok.chat_template = None
    return out


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_saved_template_honours_add_generation_prompt(saved_dirs, tok, name):
    """Every built-in's saved chat_template renders the generation prompt only when asked for; what it renders
    is what chatsft renders (for a table format, the golden prompt; a conversation ending on a reply is the
    training text)."""
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(saved_dirs[name])
    with_cue = saved.apply_chat_template(QA[:3], tokenize=False, add_generation_prompt=True)
    without = saved.apply_chat_template(QA[:3], tokenize=False, add_generation_prompt=False)
    template = get_template(name, tok)[0]
    for messages, gen, text in ((QA[:3], True, with_cue), (QA[:3], False, without)):
        assert text == render_text(template, messages, add_generation_prompt=gen, bos="<s>", eos="</s>")
    assert saved.apply_chat_template(QA, tokenize=False) == render_text(template, QA, bos="<s>", eos="</s>")
    if name in TABLE:
        cue = TABLE[name].cue + TABLE[name].single_cue
        assert with_cue == GOLDEN_PROMPT[name]
        assert without == GOLDEN_PROMPT[name][: len(GOLDEN_PROMPT[name]) - len(cue)]
    # llama-2 and mistral (as their real templates) have no cue: [/INST] ends the user turn
    assert (without != with_cue) == (name not in ("llama-2", "mistral"))


def test_vicuna_export_without_generation_prompt_matches_fastchat():
    """FastChat's get_prompt() after the BOS: with an empty assistant slot (the generation prompt) the prompt
    ends in 'ASSISTANT:'; without one, the user turn ends with its separator ' ' (ADD_COLON_TWO, sep=' ')."""
    prompt = f"<s>{VICUNA_SYSTEM} USER: q1 ASSISTANT: a1</s>USER: q2 "
    assert render_text(BUILTINS["vicuna_v1.1"], QA[:3]) == prompt
    assert render_text(BUILTINS["vicuna_v1.1"], QA[:3], add_generation_prompt=True) == prompt + "ASSISTANT:"


# ---- golden tests: each built-in equals its family's real chat template, byte for byte ----

REAL_TEMPLATES = Path(chatsft.__file__).parent / "assets" / "templates"
U, A, S = "user", "assistant", "system"
STRESS = [  # plain chat, system prompts (empty too), whitespace at the ends, multi-turn, CJK, template text
    [{"role": U, "content": "Hi"}, {"role": A, "content": "Hello! How can I help?"}],
    [{"role": S, "content": "Be brief."}, *QA],
    [{"role": S, "content": ""}, *QA[:2]],
    [{"role": U, "content": "  padded question \n"}, {"role": A, "content": "\n answer with spaces \t\n"}],
    [{"role": U, "content": "你好，世界"}, {"role": A, "content": "こんにちは。안녕하세요 🙂"}, *QA[2:]],
    [{"role": U, "content": "it's \\n {{ x }} {% y %} 'q' <s> [INST]"}, {"role": A, "content": "</s> a"}],
    [m for k in range(6) for m in ({"role": U, "content": f"question {k}"}, {"role": A, "content": f"r{k}"})],
]
TOOL_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOL_SET = [  # (messages, tools) as chatsft.messages gives them: arguments a dict, content "" beside calls
    (
        [
            {"role": U, "content": "What's the weather in Paris?"},
            {"role": A, "content": "", "tool_calls": [TOOL_CALL]},
            {"role": "tool", "content": "18 C", "name": "get_weather"},
            {"role": A, "content": "It is 18 C in Paris."},
        ],
        [WEATHER_TOOL],
    ),
    (
        [
            {"role": S, "content": "You help with travel."},
            {"role": U, "content": "Paris, 天气?"},
            {"role": A, "content": "Checking.", "tool_calls": [TOOL_CALL]},
            {"role": "tool", "content": '{"temp": 18}', "name": "get_weather"},
            {"role": A, "content": "18 C. "},
            {"role": U, "content": "Thanks"},
            {"role": A, "content": "You're welcome."},
        ],
        [WEATHER_TOOL],
    ),
    ([QA[0], QA[1]], [WEATHER_TOOL]),  # tools defined, none called
]
REASONING_SET = [
    [
        {"role": U, "content": "2+2?"},
        {"role": A, "content": "4", "reasoning_content": "Two plus two is four."},
        {"role": U, "content": "And 3+3?"},
        {"role": A, "content": "\n6", "reasoning_content": "\nThree and three make six.\n"},
    ],
]
# The golden test table, one line per family: built-in -> (the trl wheel's byte copy of the family's Hub
# template, None where ours is the reference (assets/templates/README.md); the conftest fixture holding the
# family's real vocabulary, for a Jinja built-in).
GOLDEN_REAL = {
    "chatml": (None, None),
    "mistral": (None, None),
    "llama-3": ("llama3_1", "llama3_tokenizer"),
    "qwen2.5": ("qwen2_5", "qwen_tokenizer"),
    "qwen3": ("qwen3", "qwen_tokenizer"),
    "qwen3-2507": ("qwen3_instruct_2507", "qwen_tokenizer"),
    "gemma": ("gemma", "gemma_tokenizer"),
    "gemma-3": ("gemma3", "gemma_tokenizer"),
    "phi-3": ("phi3", "phi3_tokenizer"),
    "phi-3.5": ("phi3_5", "phi3_5_tokenizer"),
    "deepseek": ("deepseekv3", "deepseek_tokenizer"),
    "deepseek-r1": ("deepseek_r1_distill", "deepseek_tokenizer"),
}


def test_every_real_template_family_has_a_golden_test():
    assert set(GOLDEN_REAL) == set(BUILTINS) - {
        "vicuna_v1.1",
        "baichuan-chat",
        "baichuan2-chat",
        "yuan2",
        "llama-2",
    }
    assert {p.stem for p in REAL_TEMPLATES.glob("*.jinja")} == set(GOLDEN_REAL)
    jinja = {name for name, t in BUILTINS.items() if isinstance(t, JinjaTemplate)}
    assert jinja == {name for name, (_, vocabulary) in GOLDEN_REAL.items() if vocabulary}


def test_bundled_templates_are_trls_byte_copies():
    trl = pytest.importorskip("trl")
    theirs = Path(trl.__file__).parent / "chat_templates"
    for name, (trl_name, _) in GOLDEN_REAL.items():
        if trl_name:
            ours = (REAL_TEMPLATES / f"{name}.jinja").read_bytes()
            assert ours == (theirs / f"{trl_name}.jinja").read_bytes(), name


def _real(tok, source: str, messages, **kwargs) -> str | None:
    """The real template's rendering through transformers, None where the template itself refuses."""
    from jinja2.exceptions import TemplateError

    try:
        return tok.apply_chat_template(messages, chat_template=source, tokenize=False, **kwargs)
    except TemplateError:
        return None


def _args_as_text(messages):
    """DeepSeek's templates concatenate tool-call arguments as text: the encoder hands them JSON text."""
    out = []
    for m in messages:
        calls = [
            {**c, "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"])}}
            for c in m.get("tool_calls", ())
        ]
        out.append({**m, "tool_calls": calls} if calls else m)
    return out


@pytest.mark.parametrize("name", sorted(GOLDEN_REAL))
def test_builtin_equals_the_real_template(tok, name):
    """The golden test of every family: the built-in renders what transformers renders with the family's real
    template, byte for byte, with and without the generation prompt, on the stress set and, where the family
    writes them, on tool-calling and reasoning conversations; where the real template refuses a record, the
    built-in refuses it too."""
    source = (REAL_TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")
    template = get_template(name, tok)[0]
    cases = [(m, None) for m in STRESS]
    cases += TOOL_SET if getattr(template, "tools", False) else []
    cases += [(m, None) for m in REASONING_SET] if getattr(template, "reasoning", False) else []
    refused = 0
    for messages, tools in cases:
        messages = _args_as_text(messages) if name.startswith("deepseek") else messages
        for part, gen in ((messages, False), (messages[:-1], True)):
            kwargs = {"tools": tools, "add_generation_prompt": gen}
            real = _real(tok, source, part, **kwargs)
            if real is None:
                refused += 1
                with pytest.raises(RenderError):
                    render_text(template, part, **kwargs, bos=tok.bos_token, eos=tok.eos_token)
            else:
                assert render_text(template, part, **kwargs, bos=tok.bos_token, eos=tok.eos_token) == real
    assert refused == (4 if name == "gemma" else 0)  # Gemma's template refuses system messages


@pytest.mark.parametrize("name", sorted(n for n, t in BUILTINS.items() if not getattr(t, "tools", False)))
def test_a_template_without_tools_or_reasoning_refuses_them_with_a_reason(tok, name):
    """Tools a template cannot write are refused by the encoder with a stable reason, never trained with the
    tool calls left out; reasoning too for a table format, while a real template that does not write it drops
    it (as at inference) and the audit counts it."""
    call = [QA[0], {"role": A, "content": "", "tool_calls": [TOOL_CALL]}]
    result = [*call, {"role": "tool", "content": "18 C"}, {"role": A, "content": "18 C"}]
    thought = [QA[0], {"role": A, "content": "a1", "reasoning_content": "think first"}]
    cases = [(call, None, "template_has_no_tools"), (result, None, "template_has_no_tools")]
    cases += [(QA, [WEATHER_TOOL], "template_has_no_tools")]
    if name in TABLE:
        cases += [(thought, None, "template_has_no_reasoning")]
    encoder = Encoder(BUILTINS[name], tok)
    for messages, tools, reason in cases:
        encoded = encoder.encode(Conversation("r", messages, tools=tools))
        assert encoded.rejected == reason and f"the {name} template" in encoded.detail
    if name not in TABLE and not BUILTINS[name].reasoning:
        encoded = encoder.encode(Conversation("r", thought))
        assert encoded.notes == {"reasoning the template does not render (not trained)": 1}


@pytest.mark.parametrize("name", sorted(n for n, (_, vocabulary) in GOLDEN_REAL.items() if vocabulary))
def test_a_jinja_builtin_trains_what_the_familys_own_tokenizer_trains(request, name):
    """`--conv_template NAME` on the family's vocabulary gives the examples (ids, labels, split turns) and
    rejections that `--conv_template tokenizer` gives with the family's real template in the tokenizer;
    a whole-conversation example's ids are `apply_chat_template`'s (except where a message spells a control
    token, which we encode as text). Tool records a built-in cannot write are refused instead."""
    assert isinstance(BUILTINS[name], JinjaTemplate)
    tok = request.getfixturevalue(GOLDEN_REAL[name][1])
    tok.chat_template = source = (REAL_TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")
    try:
        own = JinjaTemplate.from_tokenizer(tok)
    finally:
        tok.chat_template = None
    builtin = get_template(name, tok)[0]
    cases = [(m, None) for m in STRESS] + [(m, None) for m in REASONING_SET] + TOOL_SET
    added = tok.get_added_vocab()
    checked = 0
    for mode in ("assistant_turns", "split_turns"):  # the built-in differs only as a template, not per mode
        ours, theirs = Encoder(builtin, tok, mode), Encoder(own, tok, mode)
        for k, (messages, tools) in enumerate(cases):
            conv = Conversation(f"r{k}", messages, tools=tools)
            a, b = ours.encode(conv), theirs.encode(conv)
            if a.rejected == "template_has_no_tools":  # theirs: trained without tools, or no round trip
                assert tools and not builtin.tools
                continue
            assert (a.rejected, a.notes) == (b.rejected, b.notes)
            assert [(e.id, e.input_ids, e.labels) for e in a.examples] == [
                (e.id, e.input_ids, e.labels) for e in b.examples
            ]
            whole = [e for e in a.examples if e.id == conv.id]
            spelled = any(t in json.dumps(messages, ensure_ascii=False) for t in added)
            if whole and mode == "assistant_turns" and not name.startswith("deepseek") and not spelled:
                kwargs = {"tools": tools, "chat_template": source, "return_dict": False}
                ids = tok.apply_chat_template(messages, tokenize=True, **kwargs)
                assert whole[0].input_ids == list(ids), (name, k)
                checked += 1
    assert checked >= (0 if name.startswith("deepseek") else 5)  # DeepSeek: the think-opening prompt


def test_readme_lists_every_builtin_in_the_families_table_and_the_flag():
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Chat templates (model families)")[1].split("\n## ")[0]
    rows = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    assert sorted(re.findall(r"`([^`]+)`", "".join(rows))) == sorted(BUILTINS)
    flag = readme.split("- `--conv_template`:")[1].split("\n- ")[0]
    assert set(BUILTINS) <= set(re.findall(r"`([^`]+)`", flag))
