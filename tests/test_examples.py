"""examples/: the configs load where they are used (TrainingArguments, accelerate's FSDP plugin, the HF
DeepSpeed "auto" filling), the scripts are valid bash whose `chatsft.train` flags parse, and vicuna.yaml is
FastChat's recipe.

DeepSpeed is not installed here, so the DeepSpeed configs go through transformers' own "auto" filling code
(`HfTrainerDeepSpeedConfig.trainer_config_process/finalize`) on top of accelerate's pure-Python config reader,
not through `TrainingArguments(deepspeed=...)`, which needs the deepspeed package.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from chatsft.errors import ConfigError
from chatsft.training.config import parse_args
from chatsft.training.distributed import check_fsdp_supported, fill_fsdp_config

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = ["train_single_node.sh", "train_multi_node.sh", "train_slurm.sbatch"]
DEEPSPEED = {"zero2.json": 2, "zero3.json": 3, "zero3_offload.json": 3}
# the scripts' settings: none may leak in from the environment that runs the tests
SCRIPT_VARS = {
    "MODEL",
    "DATA",
    "OUT",
    "GPUS",
    "GPUS_PER_NODE",
    "NNODES",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "RUN_ID",
    "STRATEGY",
    "MICRO_BATCH",
    "GLOBAL_BATCH",
    "MAX_LEN",
    "EPOCHS",
    "LR",
    "DRY_RUN",
    "CONFIG_DIR",
    "OMP_NUM_THREADS",
}


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in SCRIPT_VARS and not k.startswith("SLURM_")}


@pytest.fixture()
def gpu_like(monkeypatch):
    """The scripts ask for bf16 and tf32, which TrainingArguments refuses on a CPU-only machine."""
    import transformers.training_args as ta

    monkeypatch.setattr(ta, "is_torch_bf16_gpu_available", lambda: True)
    monkeypatch.setattr(ta, "is_torch_tf32_available", lambda: True)
    monkeypatch.setattr(ta, "enable_tf32", lambda enabled: None)
    monkeypatch.setattr("chatsft.training.distributed.accelerator_visible", lambda: True)


def _tiny():
    from chatsft.training.tiny import build_model

    class Vocab:
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 3

        def __len__(self):
            return 128

    return build_model(Vocab(), hidden_size=32, layers=2, heads=4, max_positions=64)


def test_every_file_is_described_in_the_readme():
    readme = (EXAMPLES / "README.md").read_text()
    files = sorted(p.name for p in EXAMPLES.iterdir() if p.name != "README.md")
    assert files == sorted(["vicuna.yaml", "fsdp_full_shard.json", *DEEPSPEED, *SCRIPTS])
    for name in files:
        assert f"## {name}" in readme or f"`{name}`" in readme, name


# ---- FSDP --------------------------------------------------------------------------------------------------


def test_fsdp_config_keys():
    config = json.loads((EXAMPLES / "fsdp_full_shard.json").read_text())
    assert config["version"] == 2 and config["reshard_after_forward"] is True
    assert config["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert "transformer_layer_cls_to_wrap" not in config  # chatsft detects it from the model
    assert config["activation_checkpointing"] is True and config["state_dict_type"] == "SHARDED_STATE_DICT"


def test_fsdp_config_through_training_arguments_and_the_plugin(tmp_path):
    """What runs on CPU: TrainingArguments accepts the file and accelerate's plugin builds from its arguments.

    Wrapping the model needs GPUs under torchrun (accelerate applies FSDP only there), so that last step is
    not exercised here; on CPU `check_fsdp_supported` refuses the run instead.
    """
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import TrainingArguments

    path = str(EXAMPLES / "fsdp_full_shard.json")
    args = TrainingArguments(output_dir=str(tmp_path), fsdp="full_shard", fsdp_config=path, report_to=[])
    assert args.fsdp is True
    assert args.fsdp_plugin_args == {
        "fsdp_version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "cpu_ram_efficient_loading": False,
        "state_dict_type": "SHARDED_STATE_DICT",
        "activation_checkpointing": True,
        "reshard_after_forward": True,
    }
    assert fill_fsdp_config(args, _tiny()) == [
        "FSDP: each LlamaDecoderLayer is one shard unit (detected from the model)"
    ]
    # what Trainer.create_accelerator_and_postprocess builds
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    assert plugin.fsdp_version == 2 and plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert plugin.activation_checkpointing is True and "SHARDED_STATE_DICT" in str(plugin.state_dict_type)

    with pytest.raises(ConfigError, match="^--fsdp needs GPUs, but this run is one CPU process"):
        check_fsdp_supported(args)


def test_fsdp_config_conflicts_are_refused_before_loading(tmp_path):
    from transformers import TrainingArguments

    path = str(EXAMPLES / "fsdp_full_shard.json")
    both = TrainingArguments(
        output_dir=str(tmp_path), fsdp=True, fsdp_config=path, activation_checkpointing=True, report_to=[]
    )
    with pytest.raises(ConfigError, match="activation_checkpointing .* are both on: keep one"):
        check_fsdp_supported(both)
    weights_only = TrainingArguments(
        output_dir=str(tmp_path), fsdp=True, fsdp_config=path, save_only_model=True, report_to=[]
    )
    with pytest.raises(
        ConfigError, match="--save_only_model cannot be used with FSDP state_dict_type SHARDED"
    ):
        check_fsdp_supported(weights_only)


# ---- DeepSpeed ---------------------------------------------------------------------------------------------


def _autos(node, prefix=""):
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in _autos(value, f"{prefix}{key}.")]
    return [prefix[:-1]] if node == "auto" else []


@pytest.mark.parametrize(("name", "stage"), sorted(DEEPSPEED.items()))
def test_deepspeed_config_keys(name, stage):
    config = json.loads((EXAMPLES / name).read_text())
    zero = config["zero_optimization"]
    assert zero["stage"] == stage
    assert set(_autos(config)) >= {
        "bf16.enabled",
        "fp16.enabled",
        "optimizer.params.lr",
        "optimizer.params.betas",
        "optimizer.params.eps",
        "optimizer.params.weight_decay",
        "gradient_accumulation_steps",
        "gradient_clipping",
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "zero_optimization.reduce_bucket_size",
    }
    assert "scheduler" not in config  # --lr_scheduler_type (cosine) decides
    if stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # the final save needs full weights
        assert (
            zero["stage3_prefetch_bucket_size"] == "auto"
            and zero["stage3_param_persistence_threshold"] == "auto"
        )
    offload = "offload" in name
    assert (zero.get("offload_optimizer", {}).get("device") == "cpu") is offload
    assert (zero.get("offload_param", {}).get("device") == "cpu") is offload


@pytest.mark.parametrize("name", sorted(DEEPSPEED))
def test_deepspeed_autos_are_all_filled_by_the_hf_trainer(name, tmp_path):
    """transformers' own filling code leaves no "auto" and no mismatch (it does not need deepspeed)."""
    from accelerate.utils.deepspeed import HfDeepSpeedConfig
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    methods = {
        k: v
        for k, v in vars(HfTrainerDeepSpeedConfig).items()
        if k not in ("__init__", "__dict__", "__weakref__")
    }
    config = type("Filler", (HfDeepSpeedConfig,), methods)(str(EXAMPLES / name))
    config._dtype, config.mismatches = None, []
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=16,
        learning_rate=2e-5,
        weight_decay=0.0,
        report_to=[],
    )
    config.trainer_config_process(args)
    config.trainer_config_finalize(args, _tiny(), num_training_steps=100)
    assert _autos(config.config) == [] and config.mismatches == []
    assert config.config["optimizer"]["params"] == {
        "lr": 2e-5,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "weight_decay": 0.0,
    }
    assert config.config["train_batch_size"] == 2 * 16 * args.world_size
    assert config.config["zero_optimization"]["reduce_bucket_size"] == 32 * 32
    assert config.config["bf16"]["enabled"] is False and config.config["gradient_clipping"] == 1.0


# ---- launch scripts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_is_valid_bash(name):
    path = EXAMPLES / name
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    subprocess.run(["bash", "-n", str(path)], check=True)


def _dry_run(name, **env) -> list[str]:
    full_env = _clean_env()
    full_env.update(DRY_RUN="1", MODEL="/models/llama-7b", DATA="/data/d.json", OUT="/runs/v", **env)
    run = subprocess.run(
        ["bash", str(EXAMPLES / name), "--report_to", "none"],
        env=full_env,
        capture_output=True,
        text=True,
        cwd=EXAMPLES.parent,
    )
    assert run.returncode == 0, run.stderr
    return shlex.split(run.stdout)


def _train_flags(cmd: list[str]) -> list[str]:
    i = cmd.index("chatsft.train")
    assert cmd[i - 1] == "-m"
    return cmd[i + 1 :]


@pytest.mark.parametrize(
    ("name", "env", "launcher", "accum"),
    [
        (
            "train_single_node.sh",
            {"GPUS": "4"},
            ["torchrun", "--standalone", "--nnodes=1", "--nproc_per_node=4", "--shutdown-timeout=900"],
            16,
        ),
        (
            "train_multi_node.sh",
            {"MASTER_ADDR": "10.0.0.1", "NNODES": "2", "GPUS_PER_NODE": "8", "RUN_ID": "r1"},
            [
                "torchrun",
                "--nnodes=2",
                "--rdzv_backend=c10d",
                "--rdzv_endpoint=10.0.0.1:29500",
                "--rdzv_id=r1",
                "--nproc_per_node=8",
                "--shutdown-timeout=900",
            ],
            4,
        ),
        (
            "train_multi_node.sh",
            {"MASTER_ADDR": "node0", "NODE_RANK": "1", "NNODES": "4", "GPUS_PER_NODE": "4"},
            [
                "torchrun",
                "--nnodes=4",
                "--node_rank=1",
                "--master_addr=node0",
                "--master_port=29500",
                "--nproc_per_node=4",
                "--shutdown-timeout=900",
            ],
            4,
        ),
        (
            "train_slurm.sbatch",
            {
                "MASTER_ADDR": "gpu001",
                "SLURM_NNODES": "2",
                "SLURM_GPUS_ON_NODE": "8",
                "SLURM_JOB_ID": "777",
                "SLURM_CPUS_PER_TASK": "64",
            },
            [
                "srun",
                "--ntasks-per-node=1",
                "--kill-on-bad-exit=1",
                "torchrun",
                "--nnodes=2",
                "--nproc_per_node=8",
                "--shutdown-timeout=900",
                "--rdzv_backend=c10d",
                "--rdzv_endpoint=gpu001:29500",
                "--rdzv_id=777",
            ],
            4,
        ),
    ],
)
def test_script_command_parses(gpu_like, name, env, launcher, accum):
    cmd = _dry_run(name, **env)
    assert cmd[: len(launcher)] == launcher and cmd[len(launcher)] == "-m"
    from torch.distributed.run import get_args_parser

    torchrun = get_args_parser().parse_args(
        cmd[cmd.index("torchrun") + 1 :]
    )  # torchrun's own parser takes them
    assert (
        torchrun.module and torchrun.training_script == "chatsft.train" and torchrun.shutdown_timeout == 900
    )
    model, data, train, notices = parse_args(_train_flags(cmd))
    assert notices == []  # today's flag names only
    assert model.model_name_or_path == "/models/llama-7b" and data.data_path == ["/data/d.json"]
    assert train.output_dir == "/runs/v" and data.lazy_preprocess is True and train.report_to == []
    assert (
        train.bf16 and train.tf32 and train.lr_scheduler_type == "cosine" and train.model_max_length == 2048
    )
    assert (train.per_device_train_batch_size, train.gradient_accumulation_steps) == (2, accum)
    assert train.fsdp is True and train.fsdp_plugin_args["fsdp_version"] == 2
    assert (
        train.fsdp_plugin_args["activation_checkpointing"] is True and train.activation_checkpointing is False
    )
    assert Path(cmd[cmd.index("--fsdp_config") + 1]) == EXAMPLES / "fsdp_full_shard.json"


@pytest.mark.parametrize("strategy", sorted(s.removesuffix(".json") for s in DEEPSPEED))
def test_script_deepspeed_strategy(gpu_like, strategy):
    cmd = _dry_run("train_single_node.sh", STRATEGY=strategy, GPUS="8")
    flags = _train_flags(cmd)
    i = flags.index("--deepspeed")
    assert Path(flags[i + 1]) == EXAMPLES / f"{strategy}.json" and "--fsdp" not in flags
    # deepspeed is not installed: parse everything but the --deepspeed pair
    _, _, train, _ = parse_args(flags[:i] + flags[i + 2 :])
    assert train.activation_checkpointing is True and train.gradient_accumulation_steps == 8


def test_script_refusals():
    def dry_run(script: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(EXAMPLES / script)],
            env={**_clean_env(), **env, "DRY_RUN": "1"},
            capture_output=True,
            text=True,
        )

    run = dry_run("train_single_node.sh", GPUS="3")
    assert run.returncode == 2 and "GLOBAL_BATCH=128 is not a multiple of MICRO_BATCH*GPUS=6" in run.stderr
    run = dry_run("train_single_node.sh", STRATEGY="zero4")
    assert run.returncode == 2 and "STRATEGY must be fsdp, zero2, zero3 or zero3_offload" in run.stderr
    run = dry_run("train_multi_node.sh")
    assert run.returncode != 0 and "set MASTER_ADDR to the address of the first node" in run.stderr


# ---- vicuna.yaml -------------------------------------------------------------------------------------------


def test_vicuna_yaml_is_fastchats_recipe(gpu_like):
    from test_config import VICUNA_7B

    model, data, train, notices = parse_args(["--config", str(EXAMPLES / "vicuna.yaml")])
    want_model, want_data, want_train, _ = parse_args(VICUNA_7B)
    assert notices == []  # written in today's names: nothing to translate
    assert (model, data) == (want_model, want_data)
    assert train.to_dict() == want_train.to_dict()
    assert train.fsdp_config["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]


def test_vicuna_yaml_on_cpu_with_overrides(tmp_path):
    """Without the GPU-only settings it parses on this machine too, command-line flags winning."""
    model, data, train, _ = parse_args(
        [
            "--config",
            str(EXAMPLES / "vicuna.yaml"),
            "--use_cpu",
            "True",
            "--bf16",
            "False",
            "--tf32",
            "False",
            "--fsdp",
            "",
            "--output_dir",
            str(tmp_path),
            "--data_path",
            "a.json",
            "b.jsonl",
        ]
    )
    assert train.use_cpu is True and train.bf16 is False and not train.fsdp and train.fsdp_plugin_args is None
    assert train.output_dir == str(tmp_path) and data.data_path == ["a.json", "b.jsonl"]
    assert train.num_train_epochs == 3 and train.gradient_accumulation_steps == 16
