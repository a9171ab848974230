"""The HF Trainer with chatsft's loss: the LM head and cross-entropy run only where a label is trained.

Everything else (optimisation, accumulation, FSDP/DeepSpeed, checkpoints, logging) is the stock Trainer.
"""

from __future__ import annotations

from transformers import Trainer

from chatsft.loss import causal_lm_loss


class ChatTrainer(Trainer):
    """`compute_loss` through `causal_lm_loss`; token-throughput counts are taken from each training batch."""

    def __init__(self, *args, meter=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.meter = meter
        # Our loss takes num_items_in_batch itself, so the Trainer must always count trained tokens across the
        # accumulated micro-batches (exact gradient accumulation, also for models whose forward lacks **kwargs).
        self.model_accepts_loss_kwargs = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.meter is not None and model.training:
            self.meter.take(inputs)
        loss, aux = causal_lm_loss(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None and model.training:
            loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss does: DDP averages gradients
        return (loss, aux) if return_outputs else loss
