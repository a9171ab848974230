"""The workloads of benchmarks/gpu/run.py: generated conversations, the throughput variants and the loss
heads.

Conversations are generated as token ids (the model has random weights, so the text does not matter; the
lengths and which tokens train do). The length mix follows LMSYS-Chat-1M's averages as its paper gives them
(Zheng et al. 2023, table 1: 2.0 turns per conversation, 69.5 tokens per user prompt, 214.5 per response):
turns are 1 + geometric with mean 2, prompts and responses lognormal with those means (sigma 1.0 and 0.8: a
long tail of pasted documents and long answers), plus a 24-token system turn, 4 tokens of markup before each
prompt and 3 before each response, and one end-of-turn token after each response, which trains with it.
Examples longer than the sequence budget are cut to it (start kept), as `chatsft train` does.

Every throughput variant trains the same freshly initialised model (seeded) on the same examples with the same
optimizer, and is measured the same way: the token counts of `chatsft.training.metrics.batch_stats` (also for
TRL, whose batches are counted by the same collator wrapper), the time from the end of the warm-up steps to
the end of the last step (synchronised), the peak of `torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass

import torch

X = -100
MIX = {
    "turns_mean": 2.0,
    "prompt_mean": 69.5,
    "response_mean": 214.5,
    "prompt_sigma": 1.0,
    "response_sigma": 0.8,
}


def generate_examples(n: int, budget: int, vocab: int, seed: int = 0) -> list[dict]:
    """`n` examples (input_ids, labels, length) of the chat length mix above, at most `budget` tokens each."""
    g = torch.Generator().manual_seed(seed)

    def lognormal(mean: float, sigma: float) -> int:
        mu = math.log(mean) - sigma**2 / 2
        return max(1, round(math.exp(mu + sigma * torch.randn((), generator=g).item())))

    examples = []
    for _ in range(n):
        turns = 1
        while torch.rand((), generator=g).item() > 1 / MIX["turns_mean"]:
            turns += 1
        trained = [False] * 24
        for _ in range(turns):
            trained += [False] * (4 + lognormal(MIX["prompt_mean"], MIX["prompt_sigma"])) + [False] * 3
            trained += [True] * (lognormal(MIX["response_mean"], MIX["response_sigma"]) + 1)
        trained = trained[:budget]
        ids = torch.randint(10, vocab, (len(trained),), generator=g).tolist()
        labels = [t if keep else X for t, keep in zip(ids, trained)]
        examples.append({"input_ids": ids, "labels": labels, "length": len(ids)})
    return examples


def mix_summary(examples: list[dict]) -> dict:
    lengths = sorted(e["length"] for e in examples)
    trained = sum(sum(1 for y in e["labels"] if y != X) for e in examples)
    return {
        "conversations": len(examples),
        "mean_tokens": round(statistics.mean(lengths), 1),
        "median_tokens": lengths[len(lengths) // 2],
        "p95_tokens": lengths[int(0.95 * (len(lengths) - 1))],
        "max_tokens": lengths[-1],
        "trained_share": round(trained / sum(lengths), 3),
    }


@dataclass
class Workload:
    config: object  # a transformers config
    budget: int  # sequence budget (model_max_length, packed row length)
    steps: int  # timed optimizer steps
    warmup: int  # untimed steps before them
    device: str
    bf16: bool
    batch: int  # examples per padding-free batch (chatsft default), about budget / mean length


def _model(work: Workload):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(work.device):  # initialise on the GPU: a 1.5B random init on the CPU takes minutes
        model = AutoModelForCausalLM.from_config(work.config, attn_implementation="sdpa")
    model.config.use_cache = False
    return model  # fp32 master weights, as chatsft trains (bf16 autocast by the Trainer)


def _common_args(work: Workload, out: str) -> dict:
    return {
        "output_dir": out,
        "max_steps": work.warmup + work.steps,
        "learning_rate": 1e-5,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "report_to": [],
        "save_strategy": "no",
        "bf16": work.bf16,
        "use_cpu": work.device == "cpu",
        "optim": "adamw_torch_fused",
        "disable_tqdm": True,
        "seed": 0,
        "dataloader_num_workers": 0,
    }


class _Window:
    """A TrainerCallback (built lazily: transformers is imported late) that sums each step's counts after the
    warm-up and times them."""

    def __new__(cls, work: Workload, meter):
        from transformers import TrainerCallback

        class Window(TrainerCallback):
            def __init__(self):
                self.totals, self.start, self.end, self.losses = None, None, None, []

            def _sync(self):
                if work.device != "cpu":
                    torch.cuda.synchronize()

            def on_train_begin(self, args, state, control, **kwargs):
                if work.device != "cpu":
                    torch.cuda.reset_peak_memory_stats()

            def on_step_end(self, args, state, control, **kwargs):
                self._sync()
                now = time.perf_counter()
                if state.global_step == work.warmup:
                    self.start, self.totals = now, dict.fromkeys(meter.totals, 0)
                elif state.global_step > work.warmup:
                    for k, v in meter.totals.items():  # this step's counts (the log after it resets them)
                        self.totals[k] += v
                    self.end = now

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    self.losses.append(logs["loss"])

        return Window()


def _chatsft_trainer(work: Workload, model, examples, packing: bool, out: str, head: str):
    from datasets import Dataset

    from chatsft.data import Split
    from chatsft.training.config import DataArguments, TrainingArguments
    from chatsft.training.trainer import build_trainer

    args = TrainingArguments(
        **_common_args(work, out),
        model_max_length=work.budget,
        per_device_train_batch_size=1 if packing else work.batch,
        loss_head=head,
    )
    data_args = DataArguments(data_path=["generated"], packing=packing)
    split = Split(train=Dataset.from_list(examples), eval=None, train_audit=None, eval_audit=None, notices=[])
    trainer, notices = build_trainer(model, _tokenizer(), args, data_args, split)
    return trainer, trainer.meter, notices


def _trl_trainer(work: Workload, model, examples, out: str):
    """TRL's SFTTrainer at its best for this data: best-fit-decreasing packing into padding-free rows of the
    budget, its fused LM head (TRL 1.x's default), the labels given (so the same tokens train)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from chatsft.training.metrics import CountingCollator, ThroughputCallback, TokenMeter

    class CountedSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                self.meter.take(inputs)
            else:
                inputs.pop("chatsft_stats", None)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    args = SFTConfig(
        **_common_args(work, out),
        max_length=work.budget,
        packing=True,
        packing_strategy="bfd",
        padding_free=True,
        per_device_train_batch_size=1,
        dataset_num_proc=None,
    )
    data = Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
    trainer = CountedSFTTrainer(model=model, args=args, train_dataset=data, processing_class=_tokenizer())
    trainer.data_collator = CountingCollator(trainer.data_collator)
    trainer.meter = ThroughputCallback.install(trainer, TokenMeter()).meter
    return trainer, trainer.meter, []


_TOKENIZER = []


def _tokenizer():
    """A byte-level BPE with a pad token (the trainers want one; the ids are generated, not tokenized)."""
    if not _TOKENIZER:
        from chatsft.training.tiny import build_tokenizer

        _TOKENIZER.append(build_tokenizer(["user assistant system hello world"] * 4, vocab_size=300))
    return _TOKENIZER[0]


def run_variant(name: str, work: Workload, examples: list[dict], flops, peaks: dict, out: str) -> dict:
    """Train one variant for warmup + steps; its figures over the timed steps."""
    model = _model(work)
    if name == "trl":
        trainer, meter, notices = _trl_trainer(work, model, examples, out)
    else:
        head = "chunked" if name.endswith("chunked") else "plain"
        trainer, meter, notices = _chatsft_trainer(
            work, model, examples, name.startswith("chatsft --packing"), out, head
        )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for quiet in (PrinterCallback, ProgressCallback):  # one table at the end, not a log line per step
        trainer.remove_callback(quiet)
    window = _Window(work, meter)
    trainer.add_callback(window)
    trainer.train()
    peak_mem = torch.cuda.max_memory_allocated() if work.device != "cpu" else None
    seconds = window.end - window.start
    t = window.totals
    done = flops.step(t["tokens"], t["trained"], t["attended"]) if flops else None
    result = {
        "variant": name,
        "steps": work.steps,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(t["tokens"] / seconds, 1),
        "trained_tokens_per_s": round(t["trained"] / seconds, 1),
        "computed_per_step": round(t["computed"] / work.steps, 1),
        "trained_share": round(t["trained"] / max(t["computed"], 1), 4),
        "padding_share": round((t["computed"] - t["tokens"]) / max(t["computed"], 1), 4),
        "peak_gib": round(peak_mem / 2**30, 2) if peak_mem is not None else None,
        "last_loss": window.losses[-1] if window.losses else None,
        "notices": [n for n in notices if n.startswith(("packing", "MFU"))],
    }
    for key, peak in peaks.items():
        result[f"mfu_{key}"] = round(done / seconds / peak, 4) if done and peak else None
    del trainer, model
    gc.collect()
    if work.device != "cpu":
        torch.cuda.empty_cache()
    return result


def loss_heads(rows: int, hidden: int, vocab: int, device: str, repeats: int) -> list[dict]:
    """Forward + backward of the loss head on `rows` trained positions: hidden (rows, hidden) x head weight
    (vocab, hidden) -> summed cross-entropy; bf16 on the GPU, fp32 on CPU. Median time, peak extra memory."""
    import torch.nn.functional as F

    from chatsft.training.loss import chunked_cross_entropy

    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    h = (torch.randn(rows, hidden, device=device, dtype=dtype, generator=g) * 0.5).requires_grad_()
    w = (torch.randn(vocab, hidden, device=device, dtype=dtype, generator=g) * 0.02).requires_grad_()
    t = torch.randint(0, vocab, (rows,), device=device, generator=g)
    heads = {
        "plain: logits, fp32 copy, F.cross_entropy": lambda: F.cross_entropy(
            (h @ w.T).float(), t, reduction="sum"
        ),
        "chunked: logits, chunked_cross_entropy": lambda: chunked_cross_entropy(h @ w.T, t),
    }
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")
        if device != "cpu":
            heads["liger: fused linear cross-entropy"] = lambda: liger(w, h, t)
    except ImportError:
        liger = None
    results = []
    reference = None
    for name, fn in heads.items():
        times, peak = [], None
        for i in range(repeats + 1):
            h.grad = w.grad = None
            if device != "cpu":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            loss = fn()
            loss.backward()
            if device != "cpu":
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - base
            if i:
                times.append(time.perf_counter() - start)
        value = loss.item()
        reference = value if reference is None else reference
        results.append(
            {
                "head": name,
                "ms": round(1000 * statistics.median(times), 2),
                "peak_extra_gib": round(peak / 2**30, 3) if peak is not None else None,
                "loss_rel_diff": abs(value - reference) / abs(reference),
            }
        )
    if liger is None or device == "cpu":
        results.append({"head": "liger: fused linear cross-entropy", "skipped": _liger_reason(liger, device)})
    return results


def _liger_reason(liger, device: str) -> str:
    return "liger-kernel is not installed" if liger is None else "Liger's kernels are Triton: GPU only"
