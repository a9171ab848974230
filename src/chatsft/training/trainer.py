"""The HF Trainer with chatsft's loss (the LM head and cross-entropy run only where a label is trained), and
how one is built for a run: the batching the data arguments ask for (padding-free rows, packed rows or
padding), checked by the packing self-test, with the throughput meter (MFU included where the device's peak
is known) and the checkpoint marker.

Everything else (optimisation, accumulation, FSDP/DeepSpeed, checkpoints, logging) is the stock Trainer.
"""

from __future__ import annotations

from transformers import Trainer

from chatsft.collate import PackedCollator, PackedDataset, PadCollator
from chatsft.training.checkpoint import CheckpointMarker
from chatsft.training.flops import mfu_notice, model_flops, peak_flops
from chatsft.training.generations import EvalGenerations
from chatsft.training.loss import causal_lm_loss, check_packing
from chatsft.training.metrics import CountingCollator, ThroughputCallback, TokenMeter
from chatsft.training.reporting import install_log_printer


class ChatTrainer(Trainer):
    """`compute_loss` through `causal_lm_loss`; token-throughput counts are taken from each training batch."""

    def __init__(self, *args, meter=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.meter = meter
        # Our loss takes num_items_in_batch itself, so the Trainer must always count trained tokens across
        # the accumulated micro-batches (exact gradient accumulation, also for models whose forward lacks
        # **kwargs).
        self.model_accepts_loss_kwargs = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.meter is not None and model.training:
            self.meter.take(inputs)
        head = getattr(self.args, "loss_head", "plain")  # plain transformers.TrainingArguments have none
        loss, aux = causal_lm_loss(model, inputs, num_items_in_batch, head=head)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None and model.training:
            loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss does: DDP averages them
        return (loss, aux) if return_outputs else loss

    def _run_epoch(self, *args, **kwargs):
        # Resumed from the checkpoint of the last step (the final save was cut off, or a SIGTERM stopped the
        # last step): the Trainer's loop checks for the end only after a step, so it would train one step
        # past max_steps, on one more batch. Nothing is left to train.
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return
        return super()._run_epoch(*args, **kwargs)


def build_trainer(
    model, tokenizer, args, data_args, split, *, flash: bool = False, stop_ids=()
) -> tuple[ChatTrainer, list[str]]:
    """The run's Trainer over `split` (a `chatsft.data.Split`); returns it with notices. `stop_ids` end the
    replies sampled at evaluation (`--eval_generations`)."""
    notices = []
    train_dataset = split.train
    if data_args.packing:
        train_dataset = PackedDataset(split.train, args.model_max_length, lengths=split.train["length"])
        notices.append(
            f"packing: {len(split.train)} examples into {len(train_dataset)} rows of up to "
            f"{args.model_max_length} tokens ({100 * train_dataset.fill():.1f}% full)"
        )
    if data_args.padding_free or data_args.packing:
        collator = PackedCollator(return_flash_attn_kwargs=flash)
        notices.append(self_test_packing(model, split.train))
    else:
        collator = PadCollator(tokenizer.pad_token_id, pad_to_multiple_of=data_args.pad_to_multiple_of)
    # MFU counts full fine-tuning FLOPs: with adapters (frozen weights need no weight gradients) none is
    # logged
    full = all(p.requires_grad for p in model.parameters())
    flops = model_flops(model.config) if full else None
    peak = peak_flops(args.device)
    notices.append(mfu_notice(flops, peak))
    meter = TokenMeter(flops=flops, peak=peak)
    trainer = ChatTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=split.eval,
        data_collator=CountingCollator(collator),
        processing_class=tokenizer,
        callbacks=[CheckpointMarker()],
        meter=meter,
    )
    ThroughputCallback.install(trainer, meter)
    install_log_printer(trainer)
    if args.eval_generations and split.eval is not None:
        EvalGenerations.install(
            trainer,
            tokenizer,
            split.eval,
            count=args.eval_generations,
            stop_ids=stop_ids,
            max_new_tokens=args.eval_generation_max_new_tokens,
        )
    return trainer, notices


def self_test_packing(model, dataset) -> str:
    """Packed examples must not see each other: compare a few packed against single forwards before
    training."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():  # the weights stay partitioned until the Trainer builds the engine
        return "packing self-test skipped under DeepSpeed ZeRO-3 (no forward before training starts)"
    sample = [dataset[i] for i in range(min(4, len(dataset)))]
    tol = 1e-4 if next(model.parameters()).dtype.itemsize >= 4 else 1e-2
    diff = check_packing(model, sample, tol=tol)
    return f"packing self-test: max per-token loss difference {diff:.2e} (tolerance {tol:g})"
