"""Templates: golden strings for every built-in, the exported Jinja chat_template against transformers, and
`get_template`'s choice of kind (the tokenizer's own Jinja template is tested in test_jinja_templates)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import chatsft
from chatsft.errors import ConfigError
from chatsft.jinja_templates import JinjaTemplate
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
    "llama-3": (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nq1<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\na1<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nq2<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\na2<|eot_id|>",
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nSYS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nq1<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\na1<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nq2<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\na2<|eot_id|>",
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
    "llama-3": GOLDEN["llama-3"][0][: -len("a2<|eot_id|>")],
    "mistral": "<s> [INST] q1 [/INST] a1</s> [INST] q2 [/INST]",
    "chatml": GOLDEN["chatml"][0][: -len("a2<|im_end|>\n")],
    "yuan2": "q1<n>a1<n>q2<sep>",
}


@pytest.fixture(scope="module")
def tok(bpe_all_markers):
    return bpe_all_markers


def test_every_family_has_a_golden_string():
    assert set(GOLDEN) == set(BUILTINS) == set(GOLDEN_PROMPT)


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_golden_strings(name):
    plain, with_system = GOLDEN[name]
    assert render_text(BUILTINS[name], QA) == plain
    assert render_text(BUILTINS[name], SQA) == with_system
    assert render_text(BUILTINS[name], QA[:3], add_generation_prompt=True) == GOLDEN_PROMPT[name]


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_trainable_segments_are_reply_plus_end_marker(name):
    segments = render(BUILTINS[name], SQA)
    by_turn = {t: "".join(s.text for s in segments if s.trainable and s.turn == t) for t in (2, 4)}
    end = {"llama-3": "<|eot_id|>", "chatml": "<|im_end|>", "llama-2": " </s>"}.get(name, "</s>")
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


@pytest.mark.parametrize("name", sorted(BUILTINS))
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
def test_saved_template_honours_add_generation_prompt(saved_dirs, name):
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(saved_dirs[name])
    with_cue = saved.apply_chat_template(QA[:3], tokenize=False, add_generation_prompt=True)
    without = saved.apply_chat_template(QA[:3], tokenize=False, add_generation_prompt=False)
    assert with_cue == GOLDEN_PROMPT[name]
    cue = BUILTINS[name].cue + BUILTINS[name].single_cue
    assert without == GOLDEN_PROMPT[name][: len(GOLDEN_PROMPT[name]) - len(cue)]
    assert (without != with_cue) == bool(cue)  # llama-2 and mistral have no cue: [/INST] ends the user turn
    # a conversation ending on a reply renders the same with either flag set off, and is what trains
    assert saved.apply_chat_template(QA, tokenize=False) == render_text(BUILTINS[name], QA)


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
GOLDEN_REAL = {  # built-in name -> its family's real template (assets/templates/, README there says whose)
    "chatml": "chatml.jinja",
    "mistral": "mistral.jinja",
}


def _real(tok, source: str, messages, **kwargs) -> str | None:
    """The real template's rendering through transformers, None where the template itself refuses."""
    from jinja2.exceptions import TemplateError

    try:
        return tok.apply_chat_template(messages, chat_template=source, tokenize=False, **kwargs)
    except TemplateError:
        return None


@pytest.mark.parametrize("name", sorted(GOLDEN_REAL))
def test_builtin_equals_the_real_template(tok, name):
    source = (REAL_TEMPLATES / GOLDEN_REAL[name]).read_text(encoding="utf-8")
    template, tokens = BUILTINS[name], {"bos": tok.bos_token, "eos": tok.eos_token}
    for messages in STRESS:
        assert render_text(template, messages, **tokens) == _real(tok, source, messages)
        prompt = messages[:-1]
        ours = render_text(template, prompt, add_generation_prompt=True, **tokens)
        assert ours == _real(tok, source, prompt, add_generation_prompt=True)


TOOL_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.mark.parametrize("name", sorted(n for n, t in BUILTINS.items() if not hasattr(t, "source")))
def test_a_table_format_refuses_tools_and_reasoning_with_a_reason(name):
    template = BUILTINS[name]
    call = [QA[0], {"role": A, "content": "", "tool_calls": [TOOL_CALL]}]
    result = [QA[0], {"role": "tool", "content": "18 C", "tool_call_id": "c1"}]
    thought = [QA[0], {"role": A, "content": "a1", "reasoning_content": "think first"}]
    cases = [(call, None, "template_has_no_tools"), (result, None, "template_has_no_tools")]
    cases += [(QA, [WEATHER_TOOL], "template_has_no_tools"), (thought, None, "template_has_no_reasoning")]
    for messages, tools, reason in cases:
        with pytest.raises(RenderError) as err:
            render(template, messages, tools=tools)
        assert err.value.reason == reason and name in err.value.detail
