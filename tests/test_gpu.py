"""On a CUDA device (skipped elsewhere): packed examples stay apart under the GPU attention kernels in bf16,
the chunked loss head agrees with the plain one in bf16, MFU reaches the training log, and DeepSpeed ZeRO-3's
16-bit final save trains and saves like a plain GPU run. FSDP2 through the Trainer, its verified final save
and resuming from a checkpoint written on the GPU are `test_multiprocess.py::test_fsdp_full_shard_on_gpu`,
also `gpu`-marked. `benchmarks/gpu/run.sh` runs all of them (`-m gpu`); none has run on a GPU yet.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re

import pytest
import torch
from chatsft_runs import checkpoints, command, logged, make_setup, run, train_flags, weights

from chatsft.errors import ConfigError
from chatsft.training.flops import mfu_notice, model_flops, peak_flops
from chatsft.training.loss import causal_lm_loss, check_packing

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none is visible"),
]
X = -100


def _flash_attn_2() -> bool:
    from transformers.utils import is_flash_attn_2_available

    return is_flash_attn_2_available()


ATTENTION = [
    "sdpa",
    "flex_attention",
    pytest.param(
        "flash_attention_2",
        marks=pytest.mark.skipif(
            not _flash_attn_2(), reason="flash-attn is not installed (no wheel travels)"
        ),
    ),
]


def _qwen(attn: str = "sdpa"):
    """A small Qwen2 (grouped-query attention, q/k/v biases) in bf16 on the GPU."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=1000,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to("cuda", torch.bfloat16)


def _examples():
    g = torch.Generator().manual_seed(3)
    out = []
    for n, prompt in ((37, 20), (5, 2), (120, 70), (64, 64)):  # the last one trains nothing
        ids = torch.randint(1, 1000, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [X] * prompt + ids[prompt:]})
    return out


@pytest.mark.parametrize("attn", ATTENTION)
def test_packing_self_test_in_bf16(attn):
    """Packed vs alone, per token, within the bf16 tolerance that `build_trainer` uses (1e-2)."""
    model = _qwen(attn)
    assert model.config._attn_implementation == attn
    assert check_packing(model, _examples(), tol=1e-2) < 1e-2


class _DropsPositions(torch.nn.Module):
    """A model that ignores position_ids: packed examples see each other."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, position_ids=None, **kwargs):
        return self.inner(**kwargs)


def test_packing_self_test_still_catches_a_leak_in_bf16():
    with pytest.raises(ConfigError, match="packing self-test failed"):
        check_packing(_DropsPositions(_qwen()), _examples(), tol=1e-2)
    assert check_packing(_DropsPositions(_qwen()), _examples(), tol=math.inf) > 1e-2


def test_chunked_head_matches_the_plain_head_in_bf16():
    from chatsft.collate import PackedCollator

    batch = {k: v.cuda() for k, v in PackedCollator()(_examples()).items()}
    results = {}
    for head in ("plain", "chunked"):
        model = _qwen()
        loss, aux = causal_lm_loss(model, batch, head=head)
        loss.backward()
        results[head] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    (plain, plain_grads), (chunked, chunked_grads) = results["plain"], results["chunked"]
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, msg=name)  # bf16 tolerances


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("gpu"), dropout=0.0)


def _flags(setup, out, *extra, steps=6):
    return train_flags(
        setup,
        out,
        cache=setup.root / "cache",
        max_steps=steps,
        accumulation=2,
        save_steps=3,
        cpu=False,
        extra=extra,
    )


def test_mfu_is_logged_on_the_gpu(setup, tmp_path):
    from transformers import AutoConfig

    out = tmp_path / "mfu"
    rc, output = run(command(_flags(setup, out, "--bf16", "True", steps=3)), tmp_path / "mfu.log")
    assert rc == 0, output[-3000:]
    peak = peak_flops("cuda")
    notice = mfu_notice(model_flops(AutoConfig.from_pretrained(setup.base)), peak)
    assert notice in output
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    rows = [h for h in history if "loss" in h]
    assert len(rows) == 3 and all(h["trained_tokens_per_second"] > 0 for h in rows)
    if peak is not None:  # a GPU of the table: the field is there (about 0 for this tiny model: 4 decimals)
        assert all(0 <= h["mfu"] < 1 for h in rows)
    else:
        pytest.skip(f"{torch.cuda.get_device_name()} is not in the peak table: no mfu field to check")


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_deepspeed_zero3_16bit_final_save(setup, tmp_path):
    """ZeRO-3 under torchrun (one process), bf16, the 16-bit gather at save: the verified final model loads
    and is the model a plain bf16 GPU run trains (bf16 parameters vs fp32 masters under autocast: 5e-2)."""
    config = tmp_path / "zero3.json"
    config.write_text(
        json.dumps(
            {
                "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
                "bf16": {"enabled": "auto"},
                "train_micro_batch_size_per_gpu": "auto",
                "train_batch_size": "auto",
                "gradient_accumulation_steps": "auto",
                "gradient_clipping": "auto",
            }
        )
    )
    plain, zero3 = tmp_path / "plain", tmp_path / "zero3"
    rc, output = run(command(_flags(setup, plain, "--bf16", "True")), tmp_path / "plain.log")
    assert rc == 0, output[-3000:]
    argv = _flags(setup, zero3, "--bf16", "True", "--deepspeed", str(config))
    rc, output = run(command(argv, nproc=1, launcher=True), tmp_path / "zero3.log", timeout=400)
    assert rc == 0, output[-3000:]
    assert output.count("saved the final model") == 1
    assert sorted(checkpoints(zero3)) == [3, 6]
    for a, b in zip(logged(plain), logged(zero3)):
        assert b["loss"] == pytest.approx(a["loss"], rel=5e-2)
    w_plain, w_zero3 = weights(plain), weights(zero3)
    assert w_zero3.keys() == w_plain.keys() and all(
        w.numel() for w in w_zero3.values()
    )  # gathered, not shards
    for name in w_plain:
        torch.testing.assert_close(w_zero3[name].float(), w_plain[name].float(), rtol=0, atol=5e-2, msg=name)
    assert re.search(r"saved the final model to \S+", output)
