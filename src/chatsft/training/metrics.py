"""Throughput and efficiency figures logged with the loss: tokens/s, trained tokens/s, which share of the
computed positions is trained and which is padding, and on a GPU of known peak the model FLOPs utilisation.

Counting happens on the CPU, in the collator (`CountingCollator` adds a small dict of ints under
`collate.STATS_KEY` to every batch; it survives dataloader workers and the move to the device untouched).
The training step hands each micro-batch's counts to a `TokenMeter` (`meter.take(inputs)` in
`compute_loss`), so only batches that were really trained on are counted, once each, whatever the dataloader
prefetches; the counts add up over all micro-batches between two logs, which keeps them right under gradient
accumulation. `ThroughputCallback` turns them into rates when the Trainer logs the loss (summed over ranks
when torch.distributed is initialised: `on_log` runs on every rank) and adds them to the logged dict and to
`state.log_history`. Install it with `ThroughputCallback.install(trainer)`, which puts it before the
printing and reporting callbacks so that they show the figures too.

Definitions, per logging interval: computed = positions the model runs (`input_ids.numel()`, padding
included); tokens = computed - padding (padding = `attention_mask == 0`; packed batches have none); trained
= targets in the loss (`labels[:, 1:] != -100`, the count the HF Trainer uses for `num_items_in_batch`);
attended = causal (query, key) pairs inside examples (s(s+1)/2 for an example of s tokens). `mfu` = model
FLOPs (`chatsft.training.flops`, from the model's config and these counts) per second over the device's dense
bf16 peak times the number of ranks; it is logged only when both are known (never on CPU).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from transformers import TrainerCallback

from chatsft.collate import IGNORE_INDEX, STATS_KEY
from chatsft.training.flops import ModelFlops

FIELDS = ("examples", "computed", "tokens", "trained", "attended")


def batch_stats(batch: dict) -> dict[str, int]:
    """Counts of one collated batch (CPU tensors): examples, computed, tokens, trained, attended."""
    input_ids, labels = batch["input_ids"], batch["labels"]
    computed = input_ids.numel()
    mask = batch.get("attention_mask")
    tokens = int(mask.sum()) if mask is not None else computed
    if "position_ids" in batch and mask is None:
        positions = batch["position_ids"]
        examples = int((positions == 0).sum())
        attended = int((positions + 1).sum())  # positions restart at 0 per example: sums to s(s+1)/2 each
    else:
        examples = input_ids.shape[0]
        lengths = mask.sum(dim=1) if mask is not None else torch.full((examples,), input_ids.shape[1])
        attended = int((lengths * (lengths + 1) // 2).sum())
    trained = int((labels[:, 1:] != IGNORE_INDEX).sum())
    return {
        "examples": examples,
        "computed": computed,
        "tokens": tokens,
        "trained": trained,
        "attended": attended,
    }


class CountingCollator:
    """Wrap a collator: every batch then carries its counts under `STATS_KEY` (popped before the model)."""

    def __init__(self, collator: Callable):
        self.collator = collator

    def __call__(self, features) -> dict:
        batch = self.collator(features)
        batch[STATS_KEY] = batch_stats(batch)
        return batch


class TokenMeter:
    """Adds up batch counts between two logs and turns them into the logged figures.

    With `flops` (the model's FLOP counts) and `peak` ((device name, FLOP/s) of one rank's device), the
    figures include `mfu`.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.perf_counter,
        *,
        flops: ModelFlops | None = None,
        peak: tuple[str, float] | None = None,
    ):
        self.clock = clock
        self.flops, self.peak = flops, peak
        self.totals = dict.fromkeys(FIELDS, 0)
        self.since = clock()

    def start(self) -> None:
        self.totals = dict.fromkeys(FIELDS, 0)
        self.since = self.clock()

    def add(self, stats: dict[str, int] | None) -> None:
        if stats:
            for k in FIELDS:
                self.totals[k] += int(stats[k])

    def take(self, inputs: dict) -> None:
        """Pop the counts out of a batch and add them (call once per trained micro-batch)."""
        self.add(inputs.pop(STATS_KEY, None))

    def log_fields(self, device: torch.device | str | None = None) -> dict[str, float]:
        """Figures for the interval since the last call (or `start`), then start a new interval.

        With torch.distributed initialised, counts are summed over ranks (every rank must call this).
        """
        now = self.clock()
        elapsed = max(now - self.since, 1e-9)
        counts = [self.totals[k] for k in FIELDS]
        world = 1
        if (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        ):
            world = torch.distributed.get_world_size()
            t = torch.tensor(counts, dtype=torch.float64, device=device)
            torch.distributed.all_reduce(t)
            counts = [int(v) for v in t.tolist()]
        total = dict(zip(FIELDS, counts))
        self.totals = dict.fromkeys(FIELDS, 0)
        self.since = now
        computed = total["computed"]
        if not computed:
            return {}
        fields = {
            "tokens_per_second": round(total["tokens"] / elapsed, 1),
            "trained_tokens_per_second": round(total["trained"] / elapsed, 1),
            "trained_fraction": round(total["trained"] / computed, 4),
            "padding_fraction": round((computed - total["tokens"]) / computed, 4),
        }
        if self.flops is not None and self.peak is not None:
            done = self.flops.step(total["tokens"], total["trained"], total["attended"])
            fields["mfu"] = round(done / elapsed / (self.peak[1] * world), 4)
        return fields


class ThroughputCallback(TrainerCallback):
    """Adds the meter's figures to every training log (the dict that carries `loss`)."""

    def __init__(self, meter: TokenMeter | None = None):
        self.meter = meter or TokenMeter()

    @classmethod
    def install(cls, trainer, meter: TokenMeter | None = None) -> ThroughputCallback:
        """Create one and put it first among the callbacks, so that printers and reporters see its figures."""
        callback = cls(meter)
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def on_train_begin(self, args, state, control, **kwargs):
        self.meter.start()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        fields = self.meter.log_fields(device=getattr(args, "device", None))
        logs.update(fields)
        if state.log_history and state.log_history[-1].get("loss") == logs["loss"]:
            state.log_history[-1].update(fields)
