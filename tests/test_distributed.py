"""distributed.py: decoder layers found, FSDP refused where it would not run, full weights from FSDP2 shards.

The sharded test launches two CPU processes with torchrun (gloo): torch's own FSDP2 (`fully_shard`) runs
there, while the HF Trainer's `--fsdp` would not, which the same workers check through `check_fsdp_supported`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from chatsft_runs import free_port

from chatsft.errors import ConfigError
from chatsft.training.distributed import (
    check_fsdp_supported,
    check_launch,
    decoder_layer_classes,
    fill_fsdp_config,
    fsdp_problem,
    gather_full_state_dict,
)


class _Vocab:
    """What `chatsft.training.tiny.build_model` reads from a tokenizer; fixed, so every process builds one
    model."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 3

    def __len__(self):
        return 256


def _tiny(seed: int = 0, layers: int = 2):
    from chatsft.training.tiny import build_model

    return build_model(_Vocab(), hidden_size=32, layers=layers, heads=4, max_positions=64, seed=seed)


def _args(tmp_path, **kwargs):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], **kwargs)


# ---- decoder layers and the FSDP config --------------------------------------------------------------------


def test_decoder_layer_classes_llama():
    assert decoder_layer_classes(_tiny()) == ["LlamaDecoderLayer"]


def test_decoder_layer_classes_falls_back_to_the_repeated_block():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = torch.nn.Linear(4, 4)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.heads = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.ReLU()])  # mixed: not a stack
            self.blocks = torch.nn.ModuleList([Block() for _ in range(3)])

    assert decoder_layer_classes(Net()) == ["Block"]
    assert decoder_layer_classes(torch.nn.Linear(2, 2)) == []


def test_decoder_layer_classes_sees_through_lora():
    from chatsft.training.lora import apply_lora

    peft_model, _ = apply_lora(_tiny(), r=2)
    assert decoder_layer_classes(peft_model) == ["LlamaDecoderLayer"]


def test_fill_fsdp_config_detects_and_checks_names(tmp_path):
    args = _args(tmp_path, use_cpu=True, fsdp=True)
    assert "transformer_cls_names_to_wrap" not in args.fsdp_plugin_args
    notices = fill_fsdp_config(args, _tiny())
    assert args.fsdp_config["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    assert args.fsdp_plugin_args["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer"
    assert notices == ["FSDP: each LlamaDecoderLayer is one shard unit (detected from the model)"]

    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)  # what the Trainer builds from it
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]

    wrong = _args(
        tmp_path, use_cpu=True, fsdp=True, fsdp_config={"transformer_layer_cls_to_wrap": ["GPTJBlock"]}
    )
    with pytest.raises(
        ConfigError,
        match=r"names GPTJBlock, which this model \(LlamaForCausalLM\) does not have; "
        r"its decoder layer class is LlamaDecoderLayer",
    ):
        fill_fsdp_config(wrong, _tiny())

    assert fill_fsdp_config(_args(tmp_path, use_cpu=True), _tiny()) == []  # FSDP off: nothing to do


# ---- FSDP where it cannot run ------------------------------------------------------------------------------


def test_check_fsdp_supported_refuses_cpu(tmp_path):
    with pytest.raises(ConfigError) as err:
        check_fsdp_supported(_args(tmp_path, use_cpu=True, fsdp=True))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("--fsdp needs GPUs, but this run is one CPU process (--use_cpu is set)")
    assert "silently train without it" in message
    check_fsdp_supported(_args(tmp_path, use_cpu=True))  # no --fsdp: nothing to say


@pytest.mark.parametrize(
    ("dtype", "use_cpu", "gpu", "procs", "expected"),
    [
        ("MULTI_GPU", False, True, 8, None),
        ("FSDP", False, True, 8, None),
        ("MULTI_CPU", True, False, 2, "this run is 2 CPU processes (--use_cpu is set)"),
        ("MULTI_CPU", True, True, 4, "this run is 4 CPU processes (--use_cpu is set)"),
        ("NO", False, False, 1, "this run is one CPU process (no GPU is visible)"),
        ("NO", False, True, 1, "--fsdp needs a launcher: started as one plain process"),
    ],
)
def test_fsdp_problem_table(dtype, use_cpu, gpu, procs, expected):
    problem = fsdp_problem(dtype, use_cpu=use_cpu, accelerator_available=gpu, num_processes=procs)
    if expected is None:
        assert problem is None
    else:
        assert expected in problem


def test_check_launch_refuses_processes_that_train_alone(tmp_path, monkeypatch):
    # What torchrun on a CPU-only machine without --use_cpu gives: WORLD_SIZE=2, but accelerate's world is 1.
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError) as err:
        check_launch(_args(tmp_path))
    assert str(err.value) == (
        "the launcher started 2 processes but they form a run of 1: each would train alone and overwrite the "
        "others' checkpoints; no GPU is visible: add --use_cpu True to train on CPU with gloo"
    )
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_launch(_args(tmp_path))


# ---- full weights ------------------------------------------------------------------------------------------


def test_gather_full_state_dict_unsharded():
    model = _tiny()
    state = gather_full_state_dict(model)
    reference = model.state_dict()
    assert list(state) == list(reference)
    for name, tensor in reference.items():
        assert state[name].device.type == "cpu" and torch.equal(state[name], tensor)


WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.fsdp import fully_shard
    from transformers import TrainingArguments

    from chatsft.training.distributed import check_fsdp_supported, check_launch, gather_full_state_dict
    from chatsft.errors import ConfigError
    from chatsft.training.tiny import build_model

    class _Vocab:
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 3
        def __len__(self):
            return 256

    out = sys.argv[1]
    # What the HF Trainer would see for `torchrun ... --use_cpu --fsdp`: accelerate's MULTI_CPU (plain DDP).
    args = TrainingArguments(output_dir=out, use_cpu=True, fsdp=True, report_to=[])
    check_launch(args)  # with --use_cpu the two processes form one gloo run
    try:
        check_fsdp_supported(args)
        refusal = None
    except ConfigError as err:
        refusal = str(err)
    assert dist.is_initialized()  # set up by accelerate's PartialState (gloo), reused by fully_shard below
    rank, world = dist.get_rank(), dist.get_world_size()

    model = build_model(_Vocab(), hidden_size=32, layers=2, heads=4, max_positions=64, seed=0)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    embed = model.model.embed_tokens.weight
    full = gather_full_state_dict(model)
    if rank == 0:
        save_file(full, os.path.join(out, "model.safetensors"))
    report = {
        "rank": rank, "world": world, "distributed_type": str(args.distributed_state.distributed_type),
        "refusal": refusal, "param_type": type(embed).__name__, "local_rows": embed.to_local().shape[0],
        "full_rows": embed.shape[0], "got": None if full is None else len(full),
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()
    """
)


@pytest.mark.distributed
def test_fsdp2_full_state_dict_across_two_processes(tmp_path):
    from safetensors.torch import load_file

    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(worker),
        str(out),
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    if run.returncode != 0 and "terminate called without an active exception" in run.stdout + run.stderr:
        # Seen twice on a heavily loaded 2-core machine: a gloo worker thread aborts one rank at process
        # teardown. Not our code's doing (the same worker passes alone); launch once more rather than hide it
        # entirely.
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r, report in enumerate(reports):
        assert report["rank"] == r and report["world"] == 2
        assert report["distributed_type"] == "DistributedType.MULTI_CPU"
        assert report["refusal"].startswith(
            "--fsdp needs GPUs, but this run is 2 CPU processes (--use_cpu is set)"
        )
        assert report["param_type"] == "DTensor"  # really sharded: each rank holds half the rows
        assert (report["local_rows"], report["full_rows"]) == (128, 256)
    reference = _tiny().state_dict()
    assert reports[0]["got"] == len(reference) and reports[1]["got"] is None

    saved = load_file(out / "model.safetensors")
    assert sorted(saved) == sorted(reference)
    for name, tensor in reference.items():
        assert saved[name].dtype == tensor.dtype and saved[name].shape == tensor.shape, name
        assert torch.equal(saved[name], tensor), name
