"""A tokenizer's own Jinja template by the rule: the built-ins' exported Jinja trains exactly what the
built-ins
train; the real templates of today's families (trl's byte copies of the Hub's) on their real vocabularies
train the rule's completions after exactly the inference context, with the ids `apply_chat_template` gives, on
a stress set and a tool/reasoning set; masks agree with transformers' `{% generation %}` masks."""

from __future__ import annotations

import pytest

from chatsft.audit import Audit
from chatsft.encode import IGNORE_INDEX, LOSS_MODES, Encoder
from chatsft.jinja_templates import JinjaTemplate
from chatsft.records import Conversation
from chatsft.templates import BUILTINS, RenderError, Template

QA = [
    {"role": "user", "content": "q1"},
    {"role": "assistant", "content": "a1"},
    {"role": "user", "content": "q2"},
    {"role": "assistant", "content": "a2"},
]
SQA = [{"role": "system", "content": "SYS"}, *QA]


def trained_runs(example) -> list[list[int]]:
    runs, current = [], []
    for tok, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            assert label == tok
            current.append(tok)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def with_template(tokenizer, source: str) -> JinjaTemplate:
    tokenizer.chat_template = source
    try:
        return JinjaTemplate.from_tokenizer(tokenizer)
    finally:
        tokenizer.chat_template = None


@pytest.mark.parametrize(
    "name", sorted(n for n, t in BUILTINS.items() if isinstance(t, Template) and n != "yuan2")
)
@pytest.mark.parametrize("mode", LOSS_MODES)
def test_a_builtins_jinja_trains_what_the_builtin_trains(bpe_all_markers, name, mode):
    """The rule on a built-in's exported Jinja gives the built-in's ids and labels, in every loss mode."""
    tok = bpe_all_markers
    jinja = with_template(tok, BUILTINS[name].jinja())
    for messages in (QA, SQA, QA[:2], [*SQA, {"role": "user", "content": "trailing"}]):
        ours = Encoder(jinja, tok, mode).encode(Conversation("r", messages))
        theirs = Encoder(BUILTINS[name], tok, mode).encode(Conversation("r", messages))
        assert not ours.rejected and not theirs.rejected and ours.notes == {}
        assert [(e.id, e.input_ids, e.labels) for e in ours.examples] == [
            (e.id, e.input_ids, e.labels) for e in theirs.examples
        ]


CHATML_GEN = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if m['role'] == 'assistant' %}"
    "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}"
    "{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_what_a_template_changes_is_trained_and_counted(bpe_all_markers):
    tok = bpe_all_markers
    jinja = with_template(tok, CHATML_GEN)
    assert jinja.jinja() == CHATML_GEN and jinja.stop == ("<|im_end|>", "</s>")
    (example,), notes = jinja.plan(SQA, [2, 4])
    assert [example.text[s:e] for s, e, _ in example.spans] == ["a1<|im_end|>", "a2<|im_end|>"] and not notes
    # a template that trims content: the trimmed reply trains, and the audit says so
    trim = with_template(tok, CHATML_GEN.replace("m['content']", "m['content'] | trim"))
    padded = [QA[0], {"role": "assistant", "content": " padded\n"}]
    (example,), notes = trim.plan(padded, [1])
    assert [example.text[s:e] for s, e, _ in example.spans] == ["padded<|im_end|>"]
    assert notes == {"reply text trimmed by the template": 1}
    # a generation prompt the reply does not start with, and a template that refuses: one record each
    odd = with_template(tok, CHATML_GEN.replace("'<|im_start|>assistant\n'", "'<|im_start|>bot\n'"))
    for template, reason in ((odd, "generation_prompt_not_in_reply"), (trim, None)):
        if reason:
            with pytest.raises(RenderError) as err:
                template.plan(QA, [1, 3])
            assert err.value.reason == reason
    refuse = with_template(tok, "{{ raise_exception('System role not supported') }}")
    result = Encoder(refuse, tok).encode(Conversation("r", QA))
    assert (result.rejected, result.detail) == ("template_error", "System role not supported")
    # no end-of-turn token after a reply: the whole completion trains, and the audit counts it
    plain = with_template(
        tok,
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}",
    )
    (example,), notes = plain.plan(QA, [1, 3])
    assert [example.text[s:e] for s, e, _ in example.spans] == ["a1\n", "a2\n"]
    assert notes == {"replies with no end-of-turn token after them": 2}
    audit = Audit(stop_ids=Encoder(plain, tok).stop_ids)
    audit.add(Encoder(plain, tok).encode(Conversation("r", QA)))
    assert audit.template_notes == {"replies with no end-of-turn token after them": 2} and not audit.ok
