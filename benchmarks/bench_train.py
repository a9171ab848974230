"""Training throughput and peak memory of the ways to batch chat examples, through the HF Trainer on CPU.

    .venv/bin/python benchmarks/bench_train.py [--lengths 512 2048] [--steps 20] [--warmup 3] [--rounds 2]

A tiny Llama (`--hidden` 128, `--layers` 2, random weights) with the real 32000-token Mistral-7B SentencePiece
tokenizer (from the mistral-common wheel), FastChat's dummy_conversation.json rendered with vicuna_v1.1,
trained for `--warmup` + `--steps` optimizer steps at each model_max_length of `--lengths`. Variants:

- `pad-to-max`: FastChat's way, reproduced here: every example padded to model_max_length, the stock Trainer
  `compute_loss` (the model's own loss over every position's logits).
- `dynamic`: chatsft `PadCollator` (pad to the longest example of the batch) + `ChatTrainer`
  (`causal_lm_loss`).
- `padding-free`: chatsft `PackedCollator` over each batch (one row, no padding): the default.
- `packing`: chatsft `--packing`: `PackedDataset` rows of up to model_max_length (best-fit decreasing), 1
  row/step.
- `trl-padding-free`, `trl-packing`: TRL's `SFTTrainer` (`padding_free=True`; `packing=True`, bfd), with a
  Vicuna chat template carrying `{% generation %}` markers and `assistant_only_loss=True`, run by
  `--trl-python` (a venv with trl: `python3 -m venv .venv-bench && .venv-bench/bin/pip install torch==2.13.0
  -e . trl`). Skipped when absent.

Batches are `--batch` examples (8), packed variants one row of up to model_max_length. Every variant runs in a
fresh process (`--threads` torch threads) so that the peak RSS (`ru_maxrss`) is its own; variants are
interleaved (all of one round, then the next). Every round trains the same batches in the same order, so each
timed step keeps its fastest time over the rounds (other work on the machine only ever slows a step down). A
step is timed from the end of the one before to its own end: data loading, collation, forward, backward and
optimizer step. Counts come from the batches trained in that window: computed = positions run (padding
included), tokens = real tokens, trained = targets in the loss (`labels[:, 1:] != -100`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DEFAULT_DATA, mistral_tokenizer_dir  # benchmarks/common.py

ROOT = Path(__file__).resolve().parent.parent
CHATSFT_VARIANTS = ("pad-to-max", "dynamic", "padding-free", "packing")
TRL_VARIANTS = ("trl-padding-free", "trl-packing")
TEMPLATE = "vicuna_v1.1"
SEED = 0

# vicuna_v1.1 as chatsft renders it (`Template.jinja()`), with the trained part of each reply (" " + content +
# EOS) inside {% generation %}: transformers' assistant mask (TRL's assistant_only_loss) then trains the same
# tokens.
VICUNA_GENERATION = (
    "{%- if messages and messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}"
    "{%- set system = 'A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives "
    "helpful, detailed, and polite answers to the user\\'s questions.' -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}"
    "{{- bos_token or '' -}}{%- if system -%}{{- system + ' ' -}}{%- endif -%}"
    "{%- for message in loop_messages -%}{%- if message['role'] == 'user' -%}"
    "{{- 'USER: ' + message['content'] + ' ASSISTANT:' -}}"
    "{%- else -%}{%- generation -%}{{- ' ' + message['content'] + (eos_token or '') -}}{%- endgeneration -%}"
    "{%- endif -%}{%- endfor -%}"
)


# ---- the parent: set up once, run every variant in its own process, print the table ------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument(
        "--concat",
        type=int,
        default=1,
        metavar="N",
        help="longer examples: each record joins 1..N random records of --data (seeded)",
    )
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    ap.add_argument(
        "--variants",
        nargs="+",
        default=[*CHATSFT_VARIANTS, *TRL_VARIANTS],
        help="names above; NAME:OPTIM runs NAME with another optimizer (e.g. padding-free:adamw_torch)",
    )
    ap.add_argument("--batch", type=int, default=8, help="examples per step (packed variants: 1 row)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument(
        "--baseline-steps",
        type=int,
        nargs=2,
        default=[1, 5],
        metavar=("WARMUP", "STEPS"),
        help="pad-to-max runs fewer steps: every one has the same shape, and each is slow",
    )
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--optim", default="adamw_torch_fused", help="the same optimizer for every variant")
    ap.add_argument("--trl-python", default=str(ROOT / ".venv-bench" / "bin" / "python"))
    ap.add_argument(
        "--workdir", help="keep the model, tokenizer and encoded data here (default: a temp folder)"
    )
    ap.add_argument(
        "--profile",
        metavar="VARIANT",
        help="run only VARIANT (first length) under cProfile and print the top functions",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)

    variants = list(a.variants)
    for v in variants:
        if v.split(":")[0] not in (*CHATSFT_VARIANTS, *TRL_VARIANTS):
            ap.error(f"unknown variant {v!r}")
    if any(v.split(":")[0] in TRL_VARIANTS for v in variants) and not Path(a.trl_python).exists():
        print(f"note: {a.trl_python} not found, skipping the TRL variants", file=sys.stderr)
        variants = [v for v in variants if v.split(":")[0] not in TRL_VARIANTS]
    workdir = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="bench_train-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if a.concat > 1:
        a.data = str(concat_records(Path(a.data), a.concat, workdir))
    stats = setup(workdir, a)
    if a.profile:
        run_worker(a, workdir, a.profile, a.lengths[0], profile=True)
        return
    results: dict[tuple[int, str], list[dict]] = {}
    for r in range(a.rounds):
        for length in a.lengths:
            for v in variants:
                res = run_worker(a, workdir, v, length)
                print(
                    f"round {r + 1} L={length} {v}: {res.get('trained_per_s', 0):.0f} trained tokens/s, "
                    f"{res.get('seconds', 0):.1f} s, peak RSS {res.get('peak_rss_mib', 0):.0f} MiB"
                    + (f" ERROR {res['error']}" if "error" in res else ""),
                    file=sys.stderr,
                    flush=True,
                )
                results.setdefault((length, v), []).append(res)
    print_table(a, stats, variants, results)
    if not a.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


def setup(workdir: Path, a) -> dict:
    """Model folder (tiny Llama + Mistral tokenizer) and the encoded-data cache, shared by every worker."""
    model_dir = workdir / "model"
    if not (model_dir / "config.json").is_file():
        from transformers import AutoTokenizer

        from chatsft.tokenizer import setup_pad_token
        from chatsft.training.tiny import build_model

        mistral_tokenizer_dir(model_dir)
        tok = AutoTokenizer.from_pretrained(model_dir)
        setup_pad_token(tok)  # unk, as `chatsft train` does; the model's pad_token_id follows
        build_model(
            tok,
            hidden_size=a.hidden,
            layers=a.layers,
            heads=max(a.hidden // 32, 1),
            max_positions=max(a.lengths),
            seed=SEED,
        ).save_pretrained(model_dir)
    stats = {}
    for length in a.lengths:
        split, _, _ = chatsft_data(model_dir, a.data, length, workdir / "cache")
        lengths = split.train["length"]
        trained = sum(sum(1 for y in ex["labels"][1:] if y != -100) for ex in split.train)
        stats[length] = {
            "examples": len(lengths),
            "tokens": sum(lengths),
            "trained": trained,
            "max": max(lengths),
            "mean": sum(lengths) / len(lengths),
        }
    return stats


def concat_records(path: Path, n: int, workdir: Path) -> Path:
    import random

    records = json.loads(path.read_text())
    rng = random.Random(SEED)
    joined = []
    for i in range(len(records)):
        parts = rng.sample(records, rng.randint(1, n))
        joined.append({"id": f"joined-{i}", "conversations": [t for r in parts for t in r["conversations"]]})
    out = workdir / f"{path.stem}-concat{n}.json"
    out.write_text(json.dumps(joined))
    return out


def run_worker(a, workdir: Path, variant: str, length: int, profile: bool = False) -> dict:
    name, _, optim = variant.partition(":")
    python = a.trl_python if name in TRL_VARIANTS else sys.executable
    warmup, steps = a.baseline_steps if name == "pad-to-max" else (a.warmup, a.steps)
    cmd = [
        python,
        __file__,
        "--worker",
        name,
        "--length",
        str(length),
        "--workdir",
        str(workdir),
        "--data",
        a.data,
        "--batch",
        str(a.batch),
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
        "--threads",
        str(a.threads),
        "--optim",
        optim or a.optim,
    ] + (["--profile", name] if profile else [])
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(a.threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "PYTHONWARNINGS": "ignore",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    }
    proc = subprocess.run(cmd, capture_output=not profile, text=True, env=env, cwd=ROOT)
    if profile:
        return {}
    last = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not last:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads(last[-1])


def print_table(a, stats, variants, results) -> None:
    import platform

    import torch

    print(
        f"\nPython {platform.python_version()}, torch {torch.__version__}, {a.threads} thread(s), "
        f"{os.cpu_count()} CPUs; "
        f"Llama hidden {a.hidden}, {a.layers} layers, vocab 32000; {Path(a.data).name}, {TEMPLATE}; "
        f"{a.batch} examples/step (packed: 1 row); {a.steps} steps timed after {a.warmup} "
        f"(pad-to-max: {a.baseline_steps[1]} after {a.baseline_steps[0]}); optimizer {a.optim}; "
        f"each step's fastest of {a.rounds} round(s)"
    )
    for length, s in stats.items():
        print(
            f"L={length}: {s['examples']} examples, {s['tokens']} tokens (mean {s['mean']:.1f}, max "
            f"{s['max']}), "
            f"{s['trained']} trained targets"
        )
    print(
        "\n| max len | variant | examples/step | positions/step | padding | tokens/s | trained tokens/s "
        "| vs pad-to-max | peak RSS MiB | trained targets timed |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    summary = []
    for length in a.lengths:
        base = best(results.get((length, "pad-to-max"), []))
        for v in variants:
            r = best(results.get((length, v), []))
            if r is None:
                errs = [x.get("error") for x in results.get((length, v), [])]
                print(f"| {length} | {v} | failed: {errs[0] if errs else '?'} |||||||")
                continue
            c, n = r["counts"], r["steps"]
            ratio = f"{r['trained_per_s'] / base['trained_per_s']:.1f}x" if base else "-"
            rss = max(x["peak_rss_mib"] for x in results[(length, v)] if "error" not in x)
            print(
                f"| {length} | {v} | {c['examples'] / n:.1f} | {c['computed'] / n:.0f} "
                f"| {(c['computed'] - c['tokens']) / c['computed']:.1%} | {r['tokens_per_s']:,.0f} "
                f"| {r['trained_per_s']:,.0f} | {ratio} | {rss:,.0f} | {c['trained']:,} |"
            )
        default = best(results.get((length, "padding-free"), []))
        trl = [(v, best(results.get((length, v), []))) for v in variants if v.split(":")[0] in TRL_VARIANTS]
        trl = [(v, r) for v, r in trl if r is not None]
        if default:
            line = f"L={length}: padding-free (the default) "
            c = default["counts"]
            line += f"real share {c['tokens'] / c['computed']:.3f}"
            if base:
                line += f", {default['trained_per_s'] / base['trained_per_s']:.1f}x pad-to-max"
            if trl:
                v, r = max(trl, key=lambda vr: vr[1]["trained_per_s"])
                line += f", {default['trained_per_s'] / r['trained_per_s']:.2f}x the best TRL setting ({v})"
            summary.append(line + " in trained tokens/s")
    print("\n" + "\n".join(summary))
    for r in [r for rs in results.values() for r in rs[:1] if r.get("check")]:
        print(f"{r['variant']} L={r['length']}: {r['check']}")
    spread = {k: [round(x["trained_per_s"]) for x in rs if "error" not in x] for k, rs in results.items()}
    print("trained tokens/s in each round: " + "; ".join(f"{v}@{L} {s}" for (L, v), s in spread.items()))


def rates(r: dict) -> dict:
    seconds = sum(r["step_seconds"])
    return {
        "seconds": seconds,
        "tokens_per_s": r["counts"]["tokens"] / seconds,
        "trained_per_s": r["counts"]["trained"] / seconds,
    }


def best(rs: list[dict]):
    """Combine the rounds of one variant: each step's fastest time over the rounds (interference from other
    work only ever slows a step down; every round trains the same batches in the same order)."""
    ok = [r for r in rs if "error" not in r]
    if not ok:
        return None
    if any(
        r["counts"] != ok[0]["counts"] or len(r["step_seconds"]) != len(ok[0]["step_seconds"]) for r in ok
    ):
        return max(ok, key=lambda r: r["trained_per_s"])  # not the same batches: the fastest round
    combined = {**ok[0], "step_seconds": [min(t) for t in zip(*(r["step_seconds"] for r in ok))]}
    return {**combined, **rates(combined)}


# ---- the worker: one variant, one length, one process ------------------------------------------------------


def chatsft_data(model_dir: Path, data: str, length: int, cache: Path):
    from chatsft.data import build_datasets
    from chatsft.encode import Encoder
    from chatsft.records import ReadPolicy
    from chatsft.templates import get_template
    from chatsft.tokenizer import prepare_tokenizer

    tokenizer = prepare_tokenizer(model_dir, model_max_length=length).tokenizer
    template, _ = get_template(TEMPLATE, tokenizer)
    encoder = Encoder(template, tokenizer, "assistant_turns", length)
    split = build_datasets(encoder, [data], seed=SEED, num_workers=1, cache_dir=cache, policy=ReadPolicy())
    return split, tokenizer, encoder


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def worker(a) -> None:
    import torch

    torch.set_num_threads(a.threads)
    from transformers import TrainerCallback

    from chatsft.training.metrics import TokenMeter

    meter = TokenMeter()
    window = {}

    class Window(TrainerCallback):
        """Starts the meter at the end of the last warm-up step, stops it at the end of the last step."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == a.warmup:
                meter.start()
                window["ends"] = [time.perf_counter()]
            elif state.global_step > a.warmup:
                window["ends"].append(time.perf_counter())
                if state.global_step == a.warmup + a.steps:
                    window["counts"] = dict(meter.totals)

    def count(stats):
        meter.add(stats)

    workdir = Path(a.workdir)
    out = {"variant": a.worker, "length": a.length, "steps": a.steps, "optim": a.optim}
    build = build_trl if a.worker in TRL_VARIANTS else build_chatsft
    trainer, check = build(a, workdir, count, Window())
    if check:
        out["check"] = check
    out["rss_before_train_mib"] = rss_mib()
    if a.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.runcall(trainer.train)
        pstats.Stats(prof).sort_stats("cumulative").print_stats(45)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    else:
        trainer.train()
    ends, counts = window["ends"], window["counts"]
    out.update(
        counts=counts,
        step_seconds=[b - e for e, b in zip(ends, ends[1:])],
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    out.update(rates(out))
    print(json.dumps(out))


def training_args(cls, a, workdir: Path, **extra):
    return cls(
        output_dir=str(workdir / f"out-{a.worker}-{a.length}"),
        per_device_train_batch_size=extra.pop("batch", a.batch),
        max_steps=a.warmup + a.steps,
        learning_rate=2e-5,
        optim=a.optim,
        use_cpu=True,
        report_to="none",
        logging_steps=100_000,
        save_strategy="no",
        disable_tqdm=True,
        seed=SEED,
        data_seed=SEED,
        dataloader_num_workers=0,
        **extra,
    )


def build_chatsft(a, workdir: Path, count, window):
    import torch
    from transformers import Trainer

    from chatsft.collate import IGNORE_INDEX, STATS_KEY, PackedCollator, PackedDataset, PadCollator
    from chatsft.training.config import TrainingArguments
    from chatsft.training.metrics import CountingCollator
    from chatsft.training.model import load_model_for
    from chatsft.training.trainer import ChatTrainer

    model_dir = workdir / "model"
    split, tokenizer, _ = chatsft_data(model_dir, a.data, a.length, workdir / "cache")
    model, _, _ = load_model_for(tokenizer, model_dir, model_max_length=a.length)
    train, batch = split.train, a.batch
    if a.worker == "pad-to-max":
        pad_id, width = tokenizer.pad_token_id, a.length

        def collate(features):  # FastChat: tokenizer(..., padding="max_length"), attention_mask = ids != pad
            ids = torch.full((len(features), width), pad_id, dtype=torch.long)
            labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
            for row, f in enumerate(features):
                ids[row, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
                labels[row, : len(f["labels"])] = torch.tensor(f["labels"])
            return {"input_ids": ids, "labels": labels, "attention_mask": ids.ne(pad_id)}

        class FastChatTrainer(Trainer):  # the stock loss: model(**batch).loss over every position
            def compute_loss(self, model, inputs, *args, **kwargs):
                stats = inputs.pop(STATS_KEY)
                if model.training:
                    count(stats)
                return super().compute_loss(model, inputs, *args, **kwargs)

        trainer_cls, base, kwargs = FastChatTrainer, collate, {}
    else:
        if a.worker == "dynamic":
            base = PadCollator(tokenizer.pad_token_id)
        else:
            base = PackedCollator()
        if a.worker == "packing":
            train, batch = PackedDataset(split.train, a.length, lengths=split.train["length"]), 1
        trainer_cls, kwargs = ChatTrainer, {"meter": _Meter(count)}
    args = training_args(TrainingArguments, a, workdir, model_max_length=a.length, batch=batch)
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=train,
        data_collator=CountingCollator(base),
        processing_class=tokenizer,
        callbacks=[window],
        **kwargs,
    )
    return trainer, None


class _Meter:
    """What ChatTrainer calls (`meter.take(inputs)` in compute_loss): pops the collator's counts, hands them
    on."""

    def __init__(self, count):
        self.count = count

    def take(self, inputs):
        from chatsft.collate import STATS_KEY

        stats = inputs.pop(STATS_KEY, None)
        if stats:
            self.count(stats)


def build_trl(a, workdir: Path, count, window):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from chatsft.records import ReadPolicy, read_conversations
    from chatsft.templates import render_text

    model_dir = workdir / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir, model_max_length=a.length)
    tokenizer.pad_token = tokenizer.unk_token  # as chatsft's setup_pad_token
    tokenizer.chat_template = VICUNA_GENERATION
    split, _, encoder = chatsft_data(model_dir, a.data, a.length, workdir / "cache")
    conversations, _ = read_conversations([a.data], ReadPolicy())
    rows = []
    for conv in conversations:
        ((_, messages, _),) = encoder.views(conv)  # drops a trailing user turn, as chatsft does
        rows.append(
            {"id": conv.id, "messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
        )
    # the generation template must render exactly chatsft's vicuna_v1.1 text
    mismatched = sum(
        tokenizer.apply_chat_template(r["messages"], tokenize=False)
        != render_text(encoder.template, r["messages"], bos=tokenizer.bos_token, eos=tokenizer.eos_token)
        for r in rows
    )
    dataset = datasets.Dataset.from_list(rows)
    packing = a.worker == "trl-packing"
    config = training_args(
        SFTConfig,
        a,
        workdir,
        batch=1 if packing else a.batch,
        bf16=False,
        gradient_checkpointing=False,
        assistant_only_loss=True,
        padding_free=True,
        packing=packing,
        packing_strategy="bfd",
        max_length=a.length if packing else None,  # TRL refuses max_length with padding_free alone
        remove_unused_columns=True,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_cache=False)
    model.config.use_cache = False

    class CountingSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            if model.training:
                count(_cpu_stats(inputs))
            return super().compute_loss(model, inputs, *args, **kwargs)

    trainer = CountingSFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[window]
    )
    # same tokens? compare TRL's prepared examples with chatsft's encoded ones
    ours = {ex["id"]: ex for ex in split.train}
    ours_trained = sum(sum(1 for y in ex["labels"] if y != -100) for ex in split.train)
    prepared = trainer.train_dataset
    theirs_trained = sum(sum(1 for y in ex["labels"] if y != -100) for ex in prepared)
    check = (
        f"template renders chatsft's text for {len(rows) - mismatched}/{len(rows)} conversations; "
        f"trained tokens in the prepared dataset: TRL {theirs_trained}, chatsft {ours_trained}"
    )
    if not packing:
        same_ids = same_labels = 0
        for r, ex in zip(rows, prepared):
            mine = ours.get(r["id"])
            if mine is not None:
                same_ids += list(mine["input_ids"]) == list(ex["input_ids"])
                same_labels += list(mine["labels"]) == list(ex["labels"])
        check += f"; identical input_ids {same_ids}/{len(rows)}, identical labels {same_labels}/{len(rows)}"
    return trainer, check


def _cpu_stats(inputs):
    from chatsft.training.metrics import batch_stats

    return batch_stats(
        {k: inputs[k] for k in ("input_ids", "labels", "attention_mask", "position_ids") if k in inputs}
    )


if __name__ == "__main__":
    main()
