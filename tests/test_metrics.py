"""metrics.py: exact counts per batch, exact figures per logging interval under gradient accumulation, and the
figures reaching the HF Trainer's log history through a compute_loss override."""

from __future__ import annotations

import pytest
import torch

from chatsft.collate import STATS_KEY, PackedCollator, PadCollator
from chatsft.training.flops import PEAK_BF16_TFLOPS, model_flops, peak_flops
from chatsft.training.metrics import CountingCollator, ThroughputCallback, TokenMeter, batch_stats

X = -100
EXAMPLES = [
    {"input_ids": [1, 5, 6, 7, 2], "labels": [X, X, X, 7, 2]},
    {"input_ids": [1, 8, 2], "labels": [X, 8, 2]},
    {"input_ids": [1, 9, 10, 11, 12, 13, 2], "labels": [X, X, X, 11, 12, 13, 2]},
]


def test_batch_stats_padded():
    stats = batch_stats(PadCollator(0)(EXAMPLES))
    # attended: causal pairs inside each example, 5*6/2 + 3*4/2 + 7*8/2 (padding attends to nothing)
    assert stats == {"examples": 3, "computed": 21, "tokens": 15, "trained": 8, "attended": 15 + 6 + 28}
    assert batch_stats(PadCollator(0, pad_to_multiple_of=8)(EXAMPLES))["computed"] == 24


def test_batch_stats_packed():
    stats = batch_stats(PackedCollator()(EXAMPLES))
    assert stats == {"examples": 3, "computed": 15, "tokens": 15, "trained": 8, "attended": 49}
    # a row without mask or positions is one example: 4 x 3 tokens -> 4 * 6 pairs
    plain = {"input_ids": torch.ones(4, 3, dtype=torch.long), "labels": torch.full((4, 3), X)}
    assert batch_stats(plain)["attended"] == 24


def test_counting_collator_adds_plain_ints():
    batch = CountingCollator(PadCollator(0))(EXAMPLES)
    assert batch[STATS_KEY] == {"examples": 3, "computed": 21, "tokens": 15, "trained": 8, "attended": 49}
    assert all(type(v) is int for v in batch[STATS_KEY].values())


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_meter_adds_micro_batches_between_logs():
    clock = _Clock()
    meter = TokenMeter(clock)
    meter.start()
    collate = CountingCollator(PadCollator(0))
    for features in (EXAMPLES, EXAMPLES[1:2]):  # two micro-batches of one optimizer step
        batch = collate(features)
        meter.take(batch)
        assert STATS_KEY not in batch
    clock.now += 2.0
    # computed 21 + 3, tokens 15 + 3, trained 8 + 2
    assert meter.log_fields() == {
        "tokens_per_second": 9.0,
        "trained_tokens_per_second": 5.0,
        "trained_fraction": round(10 / 24, 4),
        "padding_fraction": 0.25,
    }
    clock.now += 1.0
    meter.take(collate(EXAMPLES[2:]))
    assert meter.log_fields() == {
        "tokens_per_second": 7.0,
        "trained_tokens_per_second": 4.0,
        "trained_fraction": round(4 / 7, 4),
        "padding_fraction": 0.0,
    }
    assert meter.log_fields() == {}  # nothing trained since


def test_callback_adds_figures_to_training_logs_only():
    from transformers import TrainerControl, TrainerState

    clock = _Clock()
    callback = ThroughputCallback(TokenMeter(clock))
    state, control = TrainerState(), TrainerControl()
    callback.on_train_begin(None, state, control)
    callback.meter.add({"examples": 2, "computed": 10, "tokens": 8, "trained": 4, "attended": 20})
    clock.now += 2.0
    logs = {"loss": 1.5, "learning_rate": 0.1}
    state.log_history.append({**logs, "step": 1})
    callback.on_log(None, state, control, logs=logs)
    assert logs["tokens_per_second"] == 4.0 and logs["trained_tokens_per_second"] == 2.0
    assert logs["padding_fraction"] == 0.2 and logs["trained_fraction"] == 0.4
    assert state.log_history[-1]["trained_tokens_per_second"] == 2.0
    eval_logs = {"eval_loss": 1.0}
    callback.on_log(None, state, control, logs=eval_logs)
    assert eval_logs == {"eval_loss": 1.0}
    assert "mfu" not in logs  # no FLOP count, no peak: no MFU


def test_mfu_field_from_the_config_count_and_an_injected_peak():
    """The peak table is the real lookup by device name; a test entry for "cpu" makes the field appear."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=100,
        hidden_size=16,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    flops = model_flops(config)
    assert peak_flops("cpu") is None  # the shipped table knows no CPU
    peak = peak_flops("cpu", {**PEAK_BF16_TFLOPS, "cpu": 1e-6})  # 1 MFLOP/s
    assert peak == ("cpu", 1e6)
    clock = _Clock()
    meter = TokenMeter(clock, flops=flops, peak=peak)
    meter.start()
    batch = CountingCollator(PackedCollator())(EXAMPLES)  # 15 tokens, 8 trained, 49 pairs
    meter.take(batch)
    clock.now += 4.0
    # 6 * 5376 * 15 + 6 * 1600 * 8 + 12 * 32 * 49 = 483840 + 76800 + 18816 FLOPs in 4 s, over 1e6 FLOP/s
    assert meter.log_fields()["mfu"] == round(579456 / 4 / 1e6, 4)
    without_peak = TokenMeter(clock, flops=flops)
    without_peak.take(CountingCollator(PackedCollator())(EXAMPLES))
    assert "mfu" not in without_peak.log_fields()


@pytest.mark.slow
def test_figures_reach_the_trainer_log_history(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

    from chatsft.training.loss import causal_lm_loss

    class _Trainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                self.meter.take(inputs)
            loss, aux = causal_lm_loss(model, inputs, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss does
            return (loss, aux) if return_outputs else loss

    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    data = EXAMPLES + [{"input_ids": [1, 14, 2], "labels": [X, 14, 2]}]  # trained: 2, 2, 4, 2
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
        max_steps=2,
        logging_steps=1,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        train_sampling_strategy="sequential",
        disable_tqdm=True,
    )
    collator = CountingCollator(PackedCollator())
    trainer = _Trainer(model=model, args=args, train_dataset=data, data_collator=collator)
    peak = peak_flops(args.device, {"cpu": 1e-6})  # a test entry: 1 MFLOP/s for this CPU
    meter = TokenMeter(flops=model_flops(model.config), peak=peak)
    trainer.meter = ThroughputCallback.install(trainer, meter).meter
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    # step 1 = examples 0 and 1 (8 tokens, 4 trained), step 2 = examples 2 and 3 (10 tokens, 6 trained)
    assert [h["trained_fraction"] for h in logs] == [0.5, 0.6]
    assert [h["padding_fraction"] for h in logs] == [0.0, 0.0]
    assert all(h["tokens_per_second"] > 0 and torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert all(h["mfu"] > 0 for h in logs)  # about 1e5 FLOPs a step against the injected 1e6 FLOP/s
