"""loss.py: the trained-only loss equals the model's own loss and gives the same gradients (padded and packed
batches, mean and num_items_in_batch normalisation, plain and PEFT models), and the packing self-test."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_gqa_llama

from chatsft.collate import STATS_KEY, PackedCollator, PadCollator
from chatsft.errors import ConfigError
from chatsft.training.loss import (
    causal_lm_loss,
    check_packing,
    chunked_cross_entropy,
    logits_route,
    trained_positions,
)

X = -100
VOCAB = 101


def _model(attn="sdpa"):
    return tiny_gqa_llama(VOCAB, attn, pad_token_id=0)


def _examples():
    g = torch.Generator().manual_seed(2)
    out = []
    for n, prompt in ((7, 4), (3, 1), (11, 6), (5, 5)):  # the last one trains nothing
        ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [X] * prompt + ids[prompt:]})
    return out


def _grads(model):
    """Gradients by parameter name (a wrapper's `module.` prefix removed)."""
    params = model.named_parameters()
    return {n.removeprefix("module."): p.grad.detach().clone() for n, p in params if p.grad is not None}


def _reference(model, batch, num_items_in_batch=None):
    """The model's own loss on the same batch (transformers' ForCausalLMLoss over full logits)."""
    model.zero_grad()
    kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    loss = model(**batch, use_cache=False, **kwargs).loss
    loss.backward()
    return loss.detach(), _grads(model)


def _ours(model, batch, num_items_in_batch=None, route=None, head="plain"):
    model.zero_grad()
    loss, aux = causal_lm_loss(model, batch, num_items_in_batch, route=route, head=head)
    loss.backward()
    return loss.detach(), _grads(model), aux


def _assert_same(ref, ours):
    (ref_loss, ref_grads), (loss, grads) = ref, ours[:2]
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("collate", ["pad", "packed"])
@pytest.mark.parametrize("route", ["logits_to_keep", "decoder", "full_logits"])
@pytest.mark.parametrize("head", ["plain", "chunked"])
def test_loss_and_gradients_match_the_model_loss(collate, route, head):
    model = _model()
    batch = (PadCollator(0) if collate == "pad" else PackedCollator())(_examples())
    n = int((batch["labels"][:, 1:] != X).sum())
    assert n == 3 + 2 + 5
    ours = _ours(model, batch, route=route, head=head)
    _assert_same(_reference(model, batch), ours)
    assert ours[2]["num_trained"].item() == n
    # num_items_in_batch as the Trainer passes it under gradient accumulation (more items than this batch)
    items = torch.tensor(25)
    _assert_same(_reference(model, batch, items), _ours(model, batch, items, route=route, head=head))


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 64])
def test_chunked_cross_entropy_equals_the_plain_one_in_fp32(chunk_rows):
    """Loss within 1e-6 and gradients equal, whatever the block size (the last block may be short)."""
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(17, 1000, generator=g) * 3).requires_grad_()
    targets = torch.randint(0, 1000, (17,), generator=g)
    plain = F.cross_entropy(logits, targets, reduction="sum")
    (plain_grad,) = torch.autograd.grad(plain * 0.5, logits)
    chunked = chunked_cross_entropy(logits, targets, chunk_rows)
    (chunked_grad,) = torch.autograd.grad(chunked * 0.5, logits)
    assert abs(chunked.item() - plain.item()) <= 1e-6 * plain.item()
    assert abs(chunked.item() / 17 - plain.item() / 17) <= 1e-6
    torch.testing.assert_close(chunked_grad, plain_grad, atol=1e-7, rtol=1e-6)


def test_chunked_head_keeps_the_logits_dtype_for_the_gradient():
    logits = torch.randn(5, 300, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.tensor([0, 299, 7, 7, 150])
    loss = chunked_cross_entropy(logits, targets, chunk_rows=2)
    loss.backward()
    assert loss.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    reference = F.cross_entropy(logits.detach().float(), targets, reduction="sum")
    assert abs(loss.item() - reference.item()) <= 1e-6 * reference.item()


def test_unknown_loss_head_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown loss head 'fused'; choose one of plain, chunked"):
        causal_lm_loss(_model(), PadCollator(0)(_examples()), head="fused")


def test_default_route_for_transformers_models_is_logits_to_keep():
    model = _model()
    assert logits_route(model) == "logits_to_keep"


def test_head_runs_only_on_trained_positions():
    model = _model()
    batch = PadCollator(0)(_examples())
    rows = []
    handle = model.lm_head.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape))
    causal_lm_loss(model, batch)
    handle.remove()
    assert rows == [torch.Size([10, 32])]  # 10 trained targets, not 4 x 11 positions


def test_trained_positions_are_the_shifted_labels():
    labels = torch.tensor([[X, X, 5, 6, X], [X, 7, X, X, X]])
    assert trained_positions(labels).tolist() == [
        [False, True, True, False, False],
        [True, False, False, False, False],
    ]


def test_no_trained_token_gives_zero_not_nan():
    model = _model()
    batch = PadCollator(0)(_examples()[3:])
    loss, aux = causal_lm_loss(model, batch)
    assert loss.item() == 0.0 and aux["num_trained"].item() == 0
    loss.backward()  # still a graph: DDP needs every rank to run backward


def test_stats_key_never_reaches_the_model():
    model = _model()
    batch = PadCollator(0)(_examples())
    batch[STATS_KEY] = {"examples": 4}
    seen = {}
    handle = model.register_forward_pre_hook(lambda mod, args, kwargs: seen.update(kwargs), with_kwargs=True)
    causal_lm_loss(model, batch)
    handle.remove()
    assert STATS_KEY not in seen and seen["use_cache"] is False and "labels" not in seen


class _RemoteCodeLike(torch.nn.Module):
    """A causal LM like remote-code ones: `model` + `lm_head`, a forward without `logits_to_keep`."""

    def __init__(self, llama):
        super().__init__()
        self.model, self.lm_head, self.config = llama.model, llama.lm_head, llama.config

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=None, **kwargs):
        hidden = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache
        )[0]
        return type("Out", (), {"logits": self.lm_head(hidden)})()


class _Wrapper(torch.nn.Module):
    """Stands in for DDP/FSDP1/DeepSpeed: the real model under `.module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, **kwargs):
        return self.module(**kwargs)


def test_models_without_logits_to_keep_use_their_decoder_or_full_logits():
    llama = _model()
    remote = _RemoteCodeLike(llama)
    assert logits_route(remote) == "decoder"
    assert logits_route(_Wrapper(remote)) == "full_logits"  # never call submodules behind a wrapper
    assert logits_route(_Wrapper(llama)) == "logits_to_keep"  # the top-level forward goes through the wrapper
    batch = PackedCollator()(_examples())
    ref = _reference(llama, batch)
    _assert_same(ref, _ours(remote, batch))
    _assert_same(ref, _ours(_Wrapper(remote), batch))
    _assert_same(ref, _ours(_Wrapper(llama), batch))


def test_peft_lora_model():
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(_model(), lora)
    assert logits_route(model) == "logits_to_keep"
    for batch in (PadCollator(0)(_examples()), PackedCollator()(_examples())):
        ref = _reference(model, batch, torch.tensor(12))
        ours = _ours(model, batch, torch.tensor(12))
        _assert_same(ref, ours)
        assert ref[1] and all("lora_" in name for name in ref[1])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_check_packing_passes_on_isolated_attention(attn):
    model = _model(attn).train()
    diff = check_packing(model, _examples())
    assert diff < 1e-5
    assert model.training  # mode restored


class _DropsPositions(torch.nn.Module):
    """A model that ignores position_ids: packed examples see each other."""

    def __init__(self, llama):
        super().__init__()
        self.inner = llama

    def forward(self, position_ids=None, **kwargs):
        return self.inner(**kwargs)


def test_check_packing_fails_with_an_explanation_when_examples_leak():
    model = _DropsPositions(_model())
    with pytest.raises(ConfigError, match="packing self-test failed.*differs by"):
        check_packing(model, _examples())
    assert check_packing(model, _examples(), tol=math.inf) > 1e-2


@pytest.mark.slow
def test_gradient_accumulation_is_exact_through_the_trainer(tmp_path):
    """One optimizer step over 4 examples: 2 micro-batches x 2 packed examples == 1 batch of 4 (the Trainer's
    num_items_in_batch counts trained targets over the whole step; causal_lm_loss divides the sum by it)."""
    from transformers import Trainer, TrainingArguments

    class _Trainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, aux = causal_lm_loss(model, inputs, num_items_in_batch)
            return (loss, aux) if return_outputs else loss

    def one_step(batch_size, accumulation):
        model = _model()
        args = TrainingArguments(
            output_dir=str(tmp_path / f"{batch_size}x{accumulation}"),
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            learning_rate=1.0,
            optim="sgd",
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            train_sampling_strategy="sequential",
            disable_tqdm=True,
        )
        data = [_examples()[i] for i in (0, 2, 1, 3)]  # micro-batches of 8 and 2 trained targets
        _Trainer(model=model, args=args, train_dataset=data, data_collator=PackedCollator()).train()
        return dict(model.named_parameters())

    whole, accumulated = one_step(4, 1), one_step(2, 2)
    for name, p in whole.items():
        torch.testing.assert_close(accumulated[name], p, atol=1e-6, rtol=1e-5, msg=name)
    assert not torch.equal(whole["lm_head.weight"], _model().lm_head.weight)  # the step did something
