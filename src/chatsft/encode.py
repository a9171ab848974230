"""Conversations -> examples (`input_ids`, `labels`): loss modes, exact masking and truncation.

Method: render once, tokenize the whole rendered text once, mask by character spans (DESIGN's first method),
plus one repair. The ids come from one call of the tokenizer's own backend on the whole string
(`tokenizer(text, add_special_tokens=False)`; the BOS is part of the rendered text), so for ordinary content
they are, by construction, what the model sees at inference from the same chat template, including the merges
a SentencePiece tokenizer makes across piece boundaries and its prefix-space rule (Metaspace
"first"/"always"), which tokenizing piece by piece gets wrong. A token is trained when its character span lies
in a trainable segment; a token that straddles a trained/untrained boundary rejects the record
(`token_straddles_boundary`): nothing is guessed and no example is zeroed. The repair: a control token (a
special token, or a marker the template writes) spelled inside a message is replaced by the ids of its
spelling encoded as plain text in the same place (with the rest of its piece, up to the next control token the
tokenizer splits at, so no phantom prefix space follows it), so a reply mentioning `</s>` never teaches the
model to stop and a user cannot inject control tokens. Such records necessarily differ from naive inference
tokenization (which would read the control token), and only in those pieces; transformers'
`apply_chat_template(..., sanitize_control_tokens=True)` follows the same rule at inference. Split examples
get ids `ID#k`, k = 0 for the record's first assistant reply.

Speed (the eager dataset encodes every record): labels come from a few bisections per segment boundary over
the token offsets, not from Python work per token; the per-token rule stays as the fallback for offsets that
are not monotonic. Records are tokenized one at a time: one backend batch call per chunk of records was
measured slower (the chunk's renders and encodings held in memory at once cost more than the saved calls; see
benchmarks/README.md). (Over 300 lines: the built-in formats' and the Jinja templates' encoders share the
labelling and truncation code; the loss-mode views sit beside them.)
"""

from __future__ import annotations

import bisect
import itertools
import json
import operator
import weakref
from dataclasses import dataclass, field
from typing import NamedTuple

from chatsft.errors import ConfigError, RenderError
from chatsft.jinja_templates import JinjaExample, JinjaTemplate
from chatsft.records import Conversation
from chatsft.templates import ASSISTANT, USER, Segment, Template, render

IGNORE_INDEX = -100
_START, _END = operator.itemgetter(0), operator.itemgetter(1)
LOSS_MODES = ("assistant_turns", "last_response", "split_turns", "all_tokens")
_FLAG_MODES = {
    "efficient_loss": "assistant_turns",
    "last_response_loss": "last_response",
    "split_example_loss": "split_turns",
}
# an added token put before a piece so it is encoded as mid-text, not text start
_PRIME = "\ue000chatsft\ue001"


def loss_mode_from_flags(
    loss_mode: str | None = None,
    efficient_loss: bool = False,
    last_response_loss: bool = False,
    split_example_loss: bool = False,
) -> str:
    """`--loss_mode` or FastChat's Yuan2 booleans -> one loss mode. Pass loss_mode=None when the flag was not
    given."""
    flags = {
        "efficient_loss": efficient_loss,
        "last_response_loss": last_response_loss,
        "split_example_loss": split_example_loss,
    }
    given = {f"--{k}": v for k, v in _FLAG_MODES.items() if flags[k]}
    if loss_mode:
        if loss_mode not in LOSS_MODES:
            raise ConfigError(f"unknown --loss_mode {loss_mode!r}; choose from {', '.join(LOSS_MODES)}")
        given[f"--loss_mode {loss_mode}"] = loss_mode
    if len(given) > 1:
        raise ConfigError(f"{' and '.join(given)} both choose the loss; give one of them")
    return next(iter(given.values()), "assistant_turns")


@dataclass
class Example:
    id: str
    text: str
    input_ids: list[int]
    labels: list[int]
    spans: list[tuple[int, int]] | None = field(default=None, repr=False)  # char span of each token in `text`

    def to_dict(self) -> dict:
        return {"id": self.id, "text": self.text, "input_ids": self.input_ids, "labels": self.labels}


class TurnEnd(NamedTuple):  # a tuple: every trained turn makes one
    """The last trained token of a trained assistant turn."""

    example: str
    turn: int
    position: int  # index of that token in the example
    token_id: int | None  # None: cut off by truncation
    marker: str  # the end-of-turn text the template wrote
    stops: bool  # whether the template means `marker` to end generation (yuan2's '<n>' does not)


@dataclass
class Encoded:
    """What happened to one record."""

    id: str
    examples: list[Example] = field(default_factory=list)
    rejected: str | None = None
    detail: str = ""
    truncated: int = 0
    dropped: int = 0
    turn_ends: list[TurnEnd] = field(default_factory=list)
    notes: dict[str, int] = field(default_factory=dict)  # what the template changed, counted by the audit


class Encoder:
    """Encodes `records.Conversation`s with one template and tokenizer. Picklable (for `datasets.map`
    workers)."""

    def __init__(
        self,
        template: Template | JinjaTemplate,
        tokenizer,
        loss_mode: str = "assistant_turns",
        max_length: int | None = None,
    ):
        if loss_mode not in LOSS_MODES:
            raise ConfigError(f"unknown loss mode {loss_mode!r}; choose from {', '.join(LOSS_MODES)}")
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError("chatsft needs a fast (tokenizers-backed) tokenizer for exact masking")
        self.template, self.tokenizer, self.loss_mode, self.max_length = (
            template,
            tokenizer,
            loss_mode,
            max_length,
        )
        self.bos, self.eos = tokenizer.bos_token, tokenizer.eos_token
        added = tokenizer.get_added_vocab()
        control = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        if isinstance(template, JinjaTemplate):
            self._check_markers(template, added)
            self.template = template = template.bind(tokenizer)
            control |= set(template.control_tokens)
            self.stops = set(template.stop)
        else:
            self._check_markers(template, added)
            control |= {template.resolve(m, self.bos, self.eos) for m in template.markers}
            self.stops = {template.resolve(s, self.bos, self.eos) for s in template.stop}
        self.control_ids = {added[t]: t for t in control if t in added}
        self.added_ids = set(added.values())
        self._backends = {}

    def _check_markers(self, template: Template | JinjaTemplate, added: dict) -> None:
        for marker in template.markers:
            # a Jinja built-in's markers are the tokens themselves ({bos}/{eos} are a table format's)
            jinja = isinstance(template, JinjaTemplate)
            token = marker if jinja else template.resolve(marker, self.bos, self.eos)
            if not token:
                raise ConfigError(
                    f"the {template.name} template needs the tokenizer's {marker.strip('{}').upper()} "
                    "token, and this tokenizer has none"
                )
            if token not in added:
                raise ConfigError(
                    f"the {template.name} template writes the control token {token!r}, which is not a "
                    f"token of this tokenizer: add it with --add_special_tokens {token!r} "
                    "(the embeddings are resized)"
                )

    def __getstate__(self):
        return {**self.__dict__, "_backends": {}}

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The ids that end generation: the tokenizer's EOS and the template's end-of-turn tokens. The audit
        checks
        every trained reply against them, and the final save writes them into `generation_config`."""
        added = self.tokenizer.get_added_vocab()
        found = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        return tuple(sorted(found | {added[t] for t in self.stops if t in added}))

    # ---- records -> examples ----

    def encode(self, conv: Conversation, keep_spans: bool = False) -> Encoded:
        result = Encoded(id=conv.id)
        train_all = self.loss_mode == "all_tokens"
        try:
            if isinstance(self.template, JinjaTemplate):
                examples, notes = self._jinja_plan(conv)
                result.notes = dict(notes)
                made = [self.encode_jinja(ex, conv.id + ex.suffix, train_all) for ex in examples]
            else:
                tools = getattr(conv, "tools", None)
                made = [
                    self.encode_segments(
                        render(self.template, messages, trained, bos=self.bos, eos=self.eos, tools=tools),
                        ex_id,
                        train_all,
                    )
                    for ex_id, messages, trained in self.views(conv)
                ]
        except RenderError as err:
            return Encoded(id=conv.id, rejected=err.reason, detail=err.detail, notes=result.notes)
        for example, ends in made:
            self._truncate(example, ends, result)
            if not keep_spans:
                example.spans = None
        return result

    def trained_replies(self, conv: Conversation) -> tuple[list[dict], list[int]]:
        """The messages up to the last reply that trains, and the replies the loss mode trains (weight 0:
        none)."""
        messages = conv.messages
        replies = [i for i, m in enumerate(messages) if m.get("role") == ASSISTANT]
        trained = [i for i in replies if messages[i].get("weight", 1) != 0]
        if not replies:
            raise RenderError("no_assistant_reply", "the record has no assistant reply to train")
        if not trained:
            raise RenderError("no_trained_reply", "every assistant reply has weight 0")
        if self.loss_mode == "last_response":
            trained = trained[-1:]
        return messages[: trained[-1] + 1], trained

    def _jinja_plan(self, conv: Conversation) -> tuple[list[JinjaExample], dict]:
        messages, trained = self.trained_replies(conv)
        return self.template.plan(
            messages, trained, getattr(conv, "tools", None), per_turn=self.loss_mode == "split_turns"
        )

    def views(self, conv: Conversation) -> list[tuple[str, list[dict], set[int] | None]]:
        """(example id, messages, trained assistant indices) per example the loss mode makes of a record. For
        a
        Jinja template the messages are those up to the example's last trained reply (rendering decides)."""
        if isinstance(self.template, JinjaTemplate):
            messages = conv.messages
            return [
                (conv.id + ex.suffix, messages[: max(ex.turns) + 1], set(ex.turns))
                for ex in self._jinja_plan(conv)[0]
            ]
        messages = conv.messages  # render checks the roles
        if messages[-1]["role"] == USER:
            messages = messages[:-1]  # a trailing user turn has no reply to train
        replies = [i for i, m in enumerate(messages) if m["role"] == ASSISTANT]
        if not replies:
            raise RenderError("no_assistant_reply", "the record has no assistant reply to train")
        trained = [i for i in replies if messages[i].get("weight", 1) != 0]
        if not trained:
            raise RenderError("no_trained_reply", "every assistant reply has weight 0")
        every = None if len(trained) == len(replies) else set(trained)  # None: yuan2's all-replies format
        if self.loss_mode == "last_response":
            return [(conv.id, messages[: trained[-1] + 1], {trained[-1]})]
        if self.loss_mode == "split_turns":
            return [(f"{conv.id}#{replies.index(i)}", messages[: i + 1], {i}) for i in trained]
        return [(conv.id, messages, every)]

    def _truncate(self, example: Example, ends: list[TurnEnd], result: Encoded) -> None:
        limit = self.max_length
        if limit is not None and len(example.input_ids) > limit:
            result.truncated += 1
            example.input_ids, example.labels = example.input_ids[:limit], example.labels[:limit]
            if example.spans is not None:
                example.spans = example.spans[:limit]
            ends = [e if e.position < limit else e._replace(token_id=None) for e in ends]
            if all(label == IGNORE_INDEX for label in example.labels):
                result.dropped += 1
                return
        result.examples.append(example)
        result.turn_ends.extend(ends)

    # ---- segments -> ids and labels ----

    def encode_segments(self, segments: list[Segment], example_id: str = "", train_all: bool = False):
        """Tokenize the rendered text once and label each token from the segment(s) its span covers."""
        text = "".join([s.text for s in segments])
        enc = self._naive().encode(text, add_special_tokens=False)
        starts = list(itertools.accumulate([len(s.text) for s in segments[:-1]], initial=0))

        def covered(s: int, e: int) -> list[Segment]:
            a = bisect.bisect_right(starts, s) - 1
            return segments[a : max(a, bisect.bisect_right(starts, e - 1) - 1) + 1]

        ids, spans = self._sanitize(text, enc.ids, enc.offsets, covered, segments, starts)
        labeled = _label_by_segment(segments, starts, ids, spans, train_all) if ids else None
        if labeled is None:
            labeled = _label_by_token(segments, covered, ids, spans, train_all)
        labels, last, straddle = labeled
        if straddle is not None:
            s, e = spans[straddle]
            raise RenderError("token_straddles_boundary", f"token {text[s:e]!r} is part trained, part not")
        markers = {}  # turn -> its last trained template text: the end-of-turn marker
        for s in segments:
            if s.trainable and not s.content:
                markers[s.turn] = s.text
        ends, stops = [], tuple(self.stops)
        for turn, index in sorted(last.items()):
            marker = markers.get(turn, "")
            ends.append(TurnEnd(example_id, turn, index, ids[index], marker, marker.endswith(stops)))
        return Example(example_id, text, ids, labels, spans), ends

    def encode_jinja(self, plan: JinjaExample, example_id: str, train_all: bool = False):
        """Tokenize a Jinja example's text once and train every token overlapping a trained span (the rule's
        completions; an end token that absorbs the whitespace after it, Phi-3.5's rstrip `<|end|>`,
        trains)."""
        text = plan.text
        segments, pos = [], 0  # the data's control tokens as content segments, for `_sanitize`
        for s, e in plan.data:
            if s > pos:
                segments.append(Segment(text[pos:s], False, False, -1))
            segments.append(Segment(text[s:e], False, True, -1))
            pos = e
        if pos < len(text) or not segments:
            segments.append(Segment(text[pos:], False, False, -1))
        starts = list(itertools.accumulate([len(s.text) for s in segments[:-1]], initial=0))

        def covered(s: int, e: int) -> list[Segment]:
            a = bisect.bisect_right(starts, s) - 1
            return segments[a : max(a, bisect.bisect_right(starts, e - 1) - 1) + 1]

        ids, offsets = self._tokenize(text, plan.cut)
        ids, spans = self._sanitize(text, ids, offsets, covered, segments, starts)
        labels = list(ids) if train_all else [IGNORE_INDEX] * len(ids)
        ends, markers = [], dict(plan.markers)
        tok_ends = list(map(_END, spans))
        ordered = tok_ends == sorted(tok_ends)
        for s, e, turn in plan.spans:
            if ordered:  # tokens ending after s, up to the last one starting before e
                first = bisect.bisect_right(tok_ends, s)
                hit = []
                for k in range(first, len(ids)):
                    if spans[k][0] >= e:
                        break
                    hit.append(k)
            else:
                hit = [k for k, (a, b) in enumerate(spans) if a < e and b > s]
            for k in hit:
                labels[k] = ids[k]
            if hit:
                marker = markers.get(turn, "")
                ends.append(TurnEnd(example_id, turn, hit[-1], ids[hit[-1]], marker, True))
        return Example(example_id, text, ids, labels, spans), ends

    def _tokenize(self, text: str, cut: int) -> tuple[list[int], list[tuple[int, int]]]:
        """The text's ids and offsets, from one call; with `cut`, the context text[:cut] and the rest are
        tokenized apart (so the context has the inference prompt's own ids) where the tokenizer adds nothing
        at a string's start (no SentencePiece prefix space: byte-level BPE such as DeepSeek's)."""
        backend = self._naive()
        if cut and not self._prefix_kinds():
            head = backend.encode(text[:cut], add_special_tokens=False)
            tail = backend.encode(text[cut:], add_special_tokens=False)
            return head.ids + tail.ids, head.offsets + [(s + cut, e + cut) for s, e in tail.offsets]
        enc = backend.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def _prefix_kinds(self) -> str:
        """What in the backend could add a prefix at a string's start (its pre-tokenizer and normalizer)."""
        if "prefix_kinds" not in self._backends:
            backend = self.tokenizer.backend_tokenizer
            parts = (backend.pre_tokenizer, backend.normalizer)
            found = b"".join(p.__getstate__() for p in parts if p is not None)
            kinds = [k for k in (b"Metaspace", b"Prepend", b'"add_prefix_space":true') if k in found]
            self._backends["prefix_kinds"] = " ".join(k.decode() for k in kinds)
        return self._backends["prefix_kinds"]

    def _sanitize(self, text: str, ids: list[int], spans: list[tuple[int, int]], covered, segments, starts):
        """Replace each control token read from message text, and the rest of its piece (the text up to the
        next added token the tokenizer splits at), by the plain-text encoding of that stretch, encoded
        mid-text. Returns (ids, spans)."""
        bad = set()
        # only the (few) control tokens need a look: find them without a Python loop over every token
        for k in itertools.compress(range(len(ids)), map(self.control_ids.__contains__, ids)):
            s, e = spans[k]
            a = bisect.bisect_right(starts, s) - 1
            if not segments[a].content and e <= starts[a] + len(segments[a].text):
                continue  # inside one piece of template text: the template's own BOS/EOS (the usual case)
            content = [c.content for c in covered(s, e)]
            if all(content):
                bad.add(k)
            elif any(content):
                raise RenderError(
                    "control_token_across_boundary", f"{text[s:e]!r} joins message and template"
                )
        if not bad:
            return ids, spans
        tokens = list(zip(ids, spans))
        out, k = [], 0
        while k < len(tokens):
            if k not in bad:
                out.append(tokens[k])
                k += 1
                continue
            j = k + 1
            while j < len(tokens) and (j in bad or tokens[j][0] not in self.added_ids):
                j += 1
            s, e = tokens[k][1][0], tokens[j][1][0] if j < len(tokens) else len(text)
            plain = self._plain(text[s:e], s)
            if any(t in self.control_ids for t, _ in plain):
                raise RenderError(
                    "control_token_in_text", f"{text[s:e]!r} encodes to a control token as text"
                )
            out += plain
            k = j
        return [t for t, _ in out], [span for _, span in out]

    def _naive(self):
        """The tokenizer's backend, as `tokenizer(text, add_special_tokens=False)` calls it. A private copy
        when the shared one would not give whole-token offsets (a post-processor that trims them) or has
        truncation set."""
        backend = self.tokenizer.backend_tokenizer
        post = backend.post_processor.__getstate__() if backend.post_processor is not None else b""
        if b'"trim_offsets":true' not in post and backend.truncation is None and backend.padding is None:
            # as transformers sets it on every call without split_special_tokens
            backend.encode_special_tokens = False
            return backend
        if self._backends.get("naive") is None:
            from tokenizers import Tokenizer

            source = json.loads(backend.to_str())
            source["post_processor"] = source["truncation"] = source["padding"] = None
            self._backends["naive"] = Tokenizer.from_str(json.dumps(source))
        return self._backends["naive"]

    def _plain_backend(self):
        """A copy of the backend that matches no added token but `_PRIME`, built on first use (few records
        need it) and shared by every encoder of the same tokenizer (copying a 150k vocabulary takes
        seconds)."""
        if self._backends.get("plain") is None:
            key = self.tokenizer.backend_tokenizer
            cached = _PLAIN.get(key)
            if cached is None or cached[0] != key.get_vocab_size(with_added_tokens=True):
                cached = (key.get_vocab_size(with_added_tokens=True), *_plain_copy(key))
                _PLAIN[key] = cached
            self._backends["plain"] = cached[1:]
        return self._backends["plain"]

    def _plain(self, piece: str, start: int) -> list[tuple[int, tuple[int, int]]]:
        """`piece` (at `start` in the text) encoded as plain text, as mid-text (after `_PRIME`) unless start
        == 0."""
        plain, prime_id = self._plain_backend()
        enc = plain.encode(piece if start == 0 else _PRIME + piece, add_special_tokens=False)
        shift = start - (0 if start == 0 else len(_PRIME))
        pairs = [(t, (s + shift, e + shift)) for t, (s, e) in zip(enc.ids, enc.offsets)]
        if start:
            assert pairs[0][0] == prime_id
            pairs = pairs[1:]
        return pairs


def _label_by_token(segments, covered, ids, spans, train_all):
    """Labels, {turn: index of its last trained token} and the first token straddling a trained/untrained
    boundary (or None), token by token: the reference rule, for any span layout."""
    labels, last = [], {}
    for k, (tok, (s, e)) in enumerate(zip(ids, spans)):
        cover = covered(s, e)
        trainable = train_all or cover[0].trainable
        if not train_all and any(c.trainable != trainable for c in cover):
            return labels, last, k
        labels.append(tok if trainable else IGNORE_INDEX)
        if trainable and not train_all:
            last[cover[-1].turn] = k
    return labels, last, None


def _label_by_segment(segments, starts, ids, spans, train_all):
    """`_label_by_token`'s result computed per segment boundary (a few bisections per segment instead of
    Python work per token). Needs spans whose starts and ends never decrease and no empty span (what
    tokenizers give for ordinary text); returns None otherwise, and the caller takes the token path."""
    tok_starts, tok_ends = list(map(_START, spans)), list(map(_END, spans))
    if (
        any(map(operator.eq, tok_starts, tok_ends))
        or tok_starts != sorted(tok_starts)
        or tok_ends != sorted(tok_ends)
    ):
        return None
    if train_all:
        return list(ids), {}, None
    flags = [s.trainable for s in segments]
    # token runs of one trainability: a run starts at the first token starting at or after a flag change
    labels, k0, flag, straddle = [], 0, flags[0], None
    for i in range(1, len(segments)):
        if flags[i] == flags[i - 1]:
            continue
        p = starts[i]
        k = bisect.bisect_left(tok_starts, p)  # tokens before k start before p
        first = bisect.bisect_right(tok_ends, p)  # tokens from here on end after p
        if first < k and straddle is None:
            straddle = first
        labels += ids[k0:k] if flag else [IGNORE_INDEX] * (k - k0)
        k0, flag = max(k, k0), flags[i]
    labels += ids[k0:] if flag else [IGNORE_INDEX] * (len(ids) - k0)
    if straddle is not None:
        return labels[:straddle], {}, straddle
    # a turn's last token: the last one ending inside its last segment that has one (none straddles)
    last = {}
    for i in range(len(segments) - 1, -1, -1):
        seg = segments[i]
        if seg.trainable and seg.turn not in last:
            k = bisect.bisect_right(tok_ends, starts[i] + len(seg.text)) - 1
            if k >= 0 and tok_ends[k] > starts[i]:
                last[seg.turn] = k
    return labels, last, None


_PLAIN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # backend -> (size, plain copy, prime id)


def _plain_copy(backend):
    from tokenizers import AddedToken, Tokenizer

    source = json.loads(backend.to_str())
    source["post_processor"] = source["truncation"] = source["padding"] = None
    for t in source["added_tokens"]:
        t["special"] = True
    _no_phantom_space(source["pre_tokenizer"])
    source["normalizer"] = _no_prepend(source["normalizer"])
    plain = Tokenizer.from_str(json.dumps(source))
    plain.encode_special_tokens = True
    plain.add_tokens([AddedToken(_PRIME, special=False, normalized=False)])
    return plain, plain.token_to_id(_PRIME)


def _no_prepend(node):
    """Older Llama-2/Mistral exports normalize with Prepend('▁') (+ Replace(' ', '▁')), which puts a '▁'
    before every piece between added tokens, so a control token spelled in a message and re-encoded as text
    after `_PRIME` would gain a space the data lacks (`<answer></s>` -> `<answer> </s>`): the plain copy
    drops it."""
    if not isinstance(node, dict):
        return node
    if node.get("type") == "Prepend":
        return None
    if node.get("type") == "Sequence":
        kept = [n for n in map(_no_prepend, node.get("normalizers", [])) if n is not None]
        return {**node, "normalizers": kept}
    return node


def _no_phantom_space(node) -> None:
    """Legacy SentencePiece (Metaspace prepend "always") puts a space before the text after every added token;
    a control token spelled in a message must decode to itself, so the plain encoder prepends only at text
    start."""
    if isinstance(node, dict):
        if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "always":
            node["prepend_scheme"] = "first"
        for child in node.get("pretokenizers", []):
            _no_phantom_space(child)


def decode_exact(tokenizer, ids: list[int]) -> str:
    """Decode `ids` keeping a leading space (SentencePiece decoders strip the first one): decode after an
    anchor."""
    anchor = tokenizer.encode("a", add_special_tokens=False)
    kwargs = {"skip_special_tokens": False, "clean_up_tokenization_spaces": False}
    head, full = tokenizer.decode(anchor, **kwargs), tokenizer.decode(anchor + list(ids), **kwargs)
    assert full.startswith(head)
    return full[len(head) :]
