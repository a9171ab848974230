"""A tokenizer's own Jinja template by the rule: the built-ins' exported Jinja trains exactly what the
built-ins
train; the real templates of today's families (trl's byte copies of the Hub's) on their real vocabularies
train the rule's completions after exactly the inference context, with the ids `apply_chat_template` gives, on
a stress set and a tool/reasoning set; masks agree with transformers' `{% generation %}` masks."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from conftest import trl_template

from chatsft.audit import Audit
from chatsft.encode import IGNORE_INDEX, LOSS_MODES, Encoder
from chatsft.jinja_templates import JinjaTemplate
from chatsft.records import Conversation
from chatsft.templates import BUILTINS, Template

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
    # a reply that does not continue the generation prompt trains after it as the template writes it
    odd = with_template(tok, CHATML_GEN.replace("'<|im_start|>assistant\n'", "'<|im_start|>bot\n'"))
    (example,), notes = odd.plan(QA[:2], [1])
    assert example.text == "<|im_start|>user\nq1<|im_end|>\n<|im_start|>bot\nassistant\na1<|im_end|>\n"
    assert [example.text[s:e] for s, e, _ in example.spans] == ["assistant\na1<|im_end|>"]
    assert notes == {"replies that do not continue the generation prompt (trained after it as written)": 1}
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


# ---- the real templates of today's families on their real vocabularies ----


def U(text):
    return {"role": "user", "content": text}


def A(text, **extra):
    return {"role": "assistant", "content": text, **extra}


def S(text):
    return {"role": "system", "content": text}


STRESS = {
    "cjk": [
        U("用中文解释量子纠缠。"),
        A("量子纠缠：测量一个粒子，立刻知道另一个的状态。日本語も大丈夫です。"),
    ],
    "whitespace_both_ends": [U("  hello  "), A("\n  Sure!  \n"), U("\tnext\t"), A(" ok ")],
    "template_text_in_values": [
        U("What do <|im_start|>, {{ x }}, {% if %}, [INST] and <s></s> mean?"),
        A("Turn markers: <|im_start|>assistant\n, <|eot_id|>, <end_of_turn>, <|end|>, </think>."),
    ],
    "system_prompt": [S("You are a pirate. Answer in one line."), U("hi"), A("Arr, ahoy!")],
    "empty_system_prompt": [S(""), U("hi"), A("hello")],
    "many_turns": [m for i in range(8) for m in (U(f"question {i}?"), A(f"answer {i}."))],
    "long_reply": [U("Write a lot."), A(" ".join(f"word{i}" for i in range(300)))],
    "trailing_user": [U("q1"), A("a1"), U("a question nobody answered")],
    "weight_zero": [U("q1"), A("a bad reply", weight=0), U("q2"), A("a good reply")],
    "inline_think": [U("2+2?"), A("<think>\nLet me add.\n</think>\n\nThe answer is 4.")],
}


def reasoning_records():
    """Our own reasoning and tool set (beyond tool_data's): reasoning in several turns, with a tool call."""
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}, "id": "c1"}
    return {
        "reasoning_every_turn": [
            S("Think first."),
            U("2+2?"),
            A("4.", reasoning_content="2 plus 2 is 4."),
            U("times 3?"),
            A("12.", reasoning_content="4 times 3 is 12."),
        ],
        "reasoning_then_tool": [
            U("Add 2 and 3."),
            A("", reasoning_content="I should call add.", tool_calls=[call]),
            {"role": "tool", "content": "5", "tool_call_id": "c1"},
            A("It is 5.", reasoning_content="The tool said 5."),
        ],
    }


FAMILIES = {  # trl's template name -> the vocabulary fixture it is tested on
    "qwen2_5": "qwen_tokenizer",
    "qwen3": "qwen_tokenizer",
    "qwen3_instruct_2507": "qwen_tokenizer",
    "llama3": "llama3_tokenizer",
    "llama3_1": "llama3_tokenizer",
    "llama3_2": "llama3_tokenizer",
    "deepseekv3": "deepseek_tokenizer",
    "deepseek_r1_distill": "deepseek_tokenizer",
    "gemma": "gemma_tokenizer",
    "gemma3": "gemma_tokenizer",
    "phi3": "phi3_tokenizer",
    "phi3_5": "phi3_5_tokenizer",
}
# What the real templates themselves refuse (raise_exception, or no way to write tools / tool calls)
NO_TOOL_CALLS = {"llama3", "gemma", "gemma3", "phi3", "phi3_5", "deepseek_r1_distill"}
ALTERNATE = "Conversation roles must alternate user/assistant/user/assistant/..."
TEMPLATE_REFUSALS = {
    "gemma": {"System role not supported", ALTERNATE},
    "gemma3": {ALTERNATE},
    "llama3_1": {"This model only supports single tool-calls at once!"},
    "llama3_2": {"This model only supports single tool-calls at once!"},
}


def conversations():
    import tool_data

    out = [Conversation(name, msgs) for name, msgs in STRESS.items()]
    out += [Conversation(name, msgs) for name, msgs in reasoning_records().items()]
    out += [Conversation(name, msgs, tools=tools) for name, (_, msgs, tools) in tool_data.ACCEPTED.items()]
    return out


def allowed_refusal(family: str, reason: str, detail: str) -> bool:
    if reason == "template_error":
        return detail in TEMPLATE_REFUSALS.get(family, ())
    if reason == "tool_call_not_rendered":
        return family in NO_TOOL_CALLS
    return reason == "tools_not_rendered" and family in NO_TOOL_CALLS | {"deepseekv3"}


_ORACLE: dict = {}


def oracle(tok, messages, tools, **kwargs):
    """transformers' own rendering (the reference): messages as a user passes them (no `weight`). Memoized:
    the loss modes ask for the same prefixes."""
    key = (id(tok), tok.chat_template, json.dumps([messages, tools, kwargs], sort_keys=True))
    if key not in _ORACLE:
        _ORACLE[key] = _oracle(tok, messages, tools, **kwargs)
    return _ORACLE[key]


def _oracle(tok, messages, tools, **kwargs):
    plain = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
    try:
        return tok.apply_chat_template(plain, tools=tools, **kwargs)
    except TypeError:  # DeepSeek's templates concatenate arguments: they take them as JSON text
        for m in plain:
            if m.get("tool_calls"):
                m["tool_calls"] = [
                    {**c, "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"])}}
                    for c in m["tool_calls"]
                ]
        return tok.apply_chat_template(plain, tools=tools, **kwargs)


def expected_completion(tok, template, messages, k, tools):
    """The rule, computed from transformers' renderings: the completion of reply k up to its first stop."""
    context = oracle(tok, messages[:k], tools, add_generation_prompt=True, tokenize=False)
    full = oracle(tok, messages[: k + 1], tools, tokenize=False)
    if full.startswith(context):
        completion = full[len(context) :]
    elif context.endswith("<think>\n") and full.startswith(context[: -len("<think>\n")]):
        m = messages[k]
        reasoning = m.get("reasoning_content") or (
            m["content"].split("</think>")[0].split("<think>")[-1] if "</think>" in m["content"] else ""
        )
        rest = full[len(context) - len("<think>\n") :]
        completion = reasoning.strip("\n") + "\n</think>\n\n" + rest.lstrip("\n")
    else:
        return context, None
    reply = messages[k]["content"].split("</think>")[-1].strip()
    after = completion.find(reply) + len(reply) if reply and reply in completion else 0  # stops spelled in it
    ends = [completion.find(t, after) + len(t) for t in template.stop if t in completion[after:]]
    return context, completion[: min(ends)] if ends else completion


def check_record(tok, encoder, conv, family, stats):
    result = encoder.encode(conv, keep_spans=True)
    if result.rejected:
        assert allowed_refusal(family, result.rejected, result.detail), (
            conv.id,
            result.rejected,
            result.detail,
        )
        stats["refused: " + (result.detail if result.rejected == "template_error" else result.rejected)] += 1
        return
    stats["records"] += 1
    messages, _ = encoder.trained_replies(conv)
    tools = conv.tools
    spelled = any(t in str(m) for t in encoder.control_ids.values() for m in messages)
    for example in result.examples:
        turns = sorted(t.turn for t in result.turn_ends if t.example == example.id)
        host = messages[: max(turns) + 1]
        whole = oracle(tok, host, tools, tokenize=False)
        if example.text == whole and not spelled:  # the ids are the inference ids of the same conversation
            assert example.input_ids == oracle(tok, host, tools, tokenize=True, return_dict=False)
            stats["ids equal apply_chat_template"] += 1
        if encoder.loss_mode == "all_tokens":
            assert example.labels == example.input_ids
            continue
        runs = trained_token_runs(example)
        assert len(runs) == len(turns), (conv.id, example.id)
        for k, (first, last) in zip(turns, runs):
            context, want = expected_completion(tok, encoder.template, messages, k, tools)
            assert example.text.startswith(context)  # exactly the inference context precedes the reply
            a, b = example.spans[first][0], example.spans[last][1]
            if want is None:  # the reply does not continue the generation prompt: counted by the plan
                stats["replies after a prompt they do not continue"] += 1
                continue
            # the trained tokens cover exactly the rule's completion, give or take what one token joins
            assert example.text[len(context) : len(context) + len(want)] == want, (conv.id, k)
            assert a <= len(context) < example.spans[first][1]
            assert b >= len(context) + len(want) and not example.text[len(context) + len(want) : b].strip()
            if a < len(context):
                stats["a token joins the context's end and the reply's start"] += 1
            if b > len(context) + len(want):
                stats["the end token absorbs the whitespace after it"] += 1
            prompt_ids = oracle(tok, messages[:k], tools, add_generation_prompt=True, tokenize=True)
            if not spelled and example.input_ids[:first] == prompt_ids["input_ids"]:
                stats["reply preceded by exactly the inference prompt's ids"] += 1
            elif not spelled and not full_text_is_rendering(example, whole):
                # no rendering of any conversation (DeepSeek's think examples): tokenized at the prompt's end,
                # so the example starts with exactly the prompt's ids
                assert example.input_ids[: len(prompt_ids["input_ids"])] == prompt_ids["input_ids"]
                stats["think example starts with exactly the prompt's ids"] += 1
            stats["trained turns"] += 1


def full_text_is_rendering(example, whole: str) -> bool:
    return example.text == whole


def trained_token_runs(example) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, label in enumerate([*example.labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, i - 1))
            start = None
    return runs


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_real_templates_train_the_rule_on_stress_and_tool_data(request, family):
    tok = request.getfixturevalue(FAMILIES[family])
    tok.chat_template = trl_template(family)
    try:
        template = JinjaTemplate.from_tokenizer(tok)
        stats = Counter()
        for mode in LOSS_MODES:
            encoder = Encoder(template, tok, mode)
            for conv in conversations():
                check_record(tok, encoder, conv, family, stats)
        assert stats["trained turns"] > 0 and stats["records"] > 0, dict(stats)
    finally:
        tok.chat_template = None


# trl's {% generation %} variants (rewritten to be prefix-preserving). Not deepseekv3_training: its generation
# prompt opens a think block, so every turn is an example of its own and no whole-conversation mask compares.
TRAINING = {
    "qwen2_5_training": "qwen_tokenizer",
    "qwen3_training": "qwen_tokenizer",
    "llama3_training": "llama3_tokenizer",
    "gemma_training": "gemma_tokenizer",
    "phi3_training": "phi3_tokenizer",
    "phi3_5_training": "phi3_5_tokenizer",
}


@pytest.mark.parametrize("family", sorted(TRAINING))
def test_masks_against_transformers_generation_masks(request, family):
    """On the {% generation %} templates, our mask and transformers' `return_assistant_tokens_mask` agree,
    except where trl's spans reach beyond the rule: the whitespace separators around a reply (trl trains
    Qwen's "\n" after `<|im_end|>`) and Phi-3's EOS after the last `<|end|>\n` (written only when no
    generation prompt follows, so never a stop the model meets); every token we train, transformers trains."""
    tok = request.getfixturevalue(TRAINING[family])
    tok.chat_template = trl_template(family)
    try:
        encoder = Encoder(JinjaTemplate.from_tokenizer(tok), tok)
        compared = Counter()
        for conv in conversations():
            result = encoder.encode(conv)
            if result.rejected or len(result.examples) != 1:
                continue
            (example,) = result.examples
            messages, _ = encoder.trained_replies(conv)
            if any(m.get("weight") == 0 for m in messages):
                continue  # transformers has no per-message weight
            theirs = oracle(tok, messages, conv.tools, return_assistant_tokens_mask=True, return_dict=True)
            if theirs["input_ids"] != example.input_ids:
                continue  # a control token spelled in the data
            ours = [label != IGNORE_INDEX for label in example.labels]
            mask = [bool(m) for m in theirs["assistant_masks"]]
            extra = [tok.decode([t]) for t, o, m in zip(example.input_ids, ours, mask) if m and not o]
            assert all(o <= m for o, m in zip(ours, mask)), conv.id
            assert all(not text.strip() or text == tok.eos_token for text in extra), (conv.id, extra)
            compared["equal" if ours == mask else "theirs adds whitespace"] += 1
        assert sum(compared.values()) >= 5, compared
    finally:
        tok.chat_template = None


@pytest.mark.slow
def test_train_a_tiny_model_with_a_qwen3_template_on_tool_and_reasoning_data(tmp_path):
    """End to end: `chatsft train --conv_template tokenizer` with Qwen3's real template on tool and reasoning
    records; the saved tokenizer carries that template, and its generation prompt with `tools=` is the
    context the replies were trained after."""
    import tool_data
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatsft.commands.train import main
    from chatsft.training.tiny import TINY_SPECIAL_TOKENS, build_model, build_tokenizer

    source = trl_template("qwen3")
    records = [
        {"messages": msgs, "tools": tools} if tools else {"messages": msgs}
        for name, (_, msgs, tools) in tool_data.ACCEPTED.items()
        if name in ("call_with_object_arguments", "parallel_calls_with_ids", "reasoning_and_tool_call")
    ] + [{"messages": msgs} for msgs in reasoning_records().values()]
    data = tmp_path / "tools.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records * 3), encoding="utf-8")
    qwen_tokens = [
        "<tool_call>",
        "</tool_call>",
        "<tool_response>",
        "</tool_response>",
        "<think>",
        "</think>",
    ]
    texts = [json.dumps(r, ensure_ascii=False) for r in records] + [source]
    tok = build_tokenizer(texts, vocab_size=400, special_tokens=TINY_SPECIAL_TOKENS + qwen_tokens)
    tok.chat_template = source
    base, out = tmp_path / "base", tmp_path / "out"
    build_model(tok, hidden_size=32, layers=1, heads=2, max_positions=1024).save_pretrained(base)
    tok.save_pretrained(base)
    argv = ["--model_name_or_path", str(base), "--data_path", str(data), "--output_dir", str(out)]
    argv += ["--conv_template", "tokenizer", "--model_max_length", "1024", "--max_steps", "3"]
    argv += ["--per_device_train_batch_size", "4", "--use_cpu", "True", "--report_to", "none"]
    argv += ["--save_strategy", "no", "--disable_tqdm", "True", "--cache_dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    saved = AutoTokenizer.from_pretrained(out)
    assert saved.chat_template == source
    encoder = Encoder(JinjaTemplate.from_tokenizer(saved), saved)
    audit = json.loads((out / "audit.json").read_text())["train"]
    assert audit["rejected"] == {} and audit["turns_missing_stop"] == {} and audit["truncated"] == 0
    assert audit["template_notes"]["records split into several examples"] == 3 * 3
    record = records[0]  # a tool call and its result, then the answer
    conv = Conversation("r", record["messages"], tools=record["tools"])
    prompt = saved.apply_chat_template(
        record["messages"][:3], tools=record["tools"], add_generation_prompt=True, return_dict=True
    )
    (example,) = [e for e in encoder.encode(conv).examples if e.id == "r"]
    n = len(prompt["input_ids"])  # the reply trains right after exactly that prompt
    assert example.input_ids[:n] == prompt["input_ids"]
    assert example.labels[n - 1] == IGNORE_INDEX and example.labels[n] == example.input_ids[n]
    model = AutoModelForCausalLM.from_pretrained(out)
    import torch

    generated = model.generate(
        torch.tensor([prompt["input_ids"]]),
        max_new_tokens=4,
        do_sample=False,
        pad_token_id=saved.pad_token_id,
    )
    assert generated.shape[1] == len(prompt["input_ids"]) + 4 or saved.eos_token_id in generated[0].tolist()
