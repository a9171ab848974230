"""Argument parsing: FastChat's train_vicuna_7b.sh flags land where they should; --config YAML;
translations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatsft.commands.cli import main
from chatsft.errors import ConfigError
from chatsft.training.compat import translate_flags
from chatsft.training.config import parse_args
from chatsft.training.distributed import accelerator_visible

VICUNA_7B = [
    "--model_name_or_path",
    "~/model_weights/llama-7b",
    "--data_path",
    "data/dummy_conversation.json",
    "--bf16",
    "True",
    "--output_dir",
    "output_vicuna_7b",
    "--num_train_epochs",
    "3",
    "--per_device_train_batch_size",
    "2",
    "--per_device_eval_batch_size",
    "2",
    "--gradient_accumulation_steps",
    "16",
    "--evaluation_strategy",
    "no",
    "--save_strategy",
    "steps",
    "--save_steps",
    "1200",
    "--save_total_limit",
    "10",
    "--learning_rate",
    "2e-5",
    "--weight_decay",
    "0.",
    "--warmup_ratio",
    "0.03",
    "--lr_scheduler_type",
    "cosine",
    "--logging_steps",
    "1",
    "--fsdp",
    "full_shard auto_wrap",
    "--fsdp_transformer_layer_cls_to_wrap",
    "LlamaDecoderLayer",
    "--tf32",
    "True",
    "--model_max_length",
    "2048",
    "--gradient_checkpointing",
    "True",
    "--lazy_preprocess",
    "True",
]


@pytest.fixture()
def gpu_like(monkeypatch):
    """FastChat's script asks for bf16 and tf32, which TrainingArguments refuses on a CPU-only machine."""
    import transformers.training_args as ta

    monkeypatch.setattr(ta, "is_torch_bf16_gpu_available", lambda: True)
    monkeypatch.setattr(ta, "is_torch_tf32_available", lambda: True)
    monkeypatch.setattr(ta, "enable_tf32", lambda enabled: None)
    monkeypatch.setattr("chatsft.training.distributed.accelerator_visible", lambda: True)


def test_fastchat_vicuna_flags_land(gpu_like):
    model, data, train, notices = parse_args(VICUNA_7B)
    assert model.model_name_or_path == "~/model_weights/llama-7b"
    assert data.data_path == ["data/dummy_conversation.json"] and data.lazy_preprocess is True
    assert train.bf16 is True and train.tf32 is True
    assert train.output_dir == "output_vicuna_7b"
    assert train.num_train_epochs == 3
    assert (train.per_device_train_batch_size, train.per_device_eval_batch_size) == (2, 2)
    assert train.gradient_accumulation_steps == 16
    assert train.eval_strategy == "no"
    assert (train.save_strategy, train.save_steps, train.save_total_limit) == ("steps", 1200, 10)
    assert train.learning_rate == 2e-5 and train.weight_decay == 0.0
    assert train.warmup_steps == 0.03
    assert train.lr_scheduler_type == "cosine" and train.logging_steps == 1
    assert train.fsdp is True
    assert train.fsdp_config["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    assert train.fsdp_config["reshard_after_forward"] is True
    assert train.model_max_length == 2048
    assert train.activation_checkpointing is True
    assert notices == [
        "--evaluation_strategy -> --eval_strategy (renamed in transformers 4.46)",
        "--warmup_ratio -> --warmup_steps (transformers 5 takes a ratio in [0, 1) as --warmup_steps)",
        "--fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer -> --fsdp_config "
        "transformer_layer_cls_to_wrap "
        "(moved into --fsdp_config)",
        "--gradient_checkpointing -> --activation_checkpointing (renamed in transformers 5)",
    ]


# a FastChat train_lora.py command line (its docs' example), data and output swapped for local paths
LORA_FLAGS = [
    "--model_name_or_path",
    "lmsys/vicuna-7b-v1.5",
    "--lora_r",
    "8",
    "--lora_alpha",
    "16",
    "--lora_dropout",
    "0.05",
    "--data_path",
    "data/dummy_conversation.json",
    "--output_dir",
    "./checkpoints",
    "--num_train_epochs",
    "150",
    "--fp16",
    "True",
    "--per_device_train_batch_size",
    "2",
    "--per_device_eval_batch_size",
    "2",
    "--gradient_accumulation_steps",
    "1",
    "--evaluation_strategy",
    "steps",
    "--eval_steps",
    "100",
    "--save_strategy",
    "steps",
    "--save_steps",
    "200",
    "--save_total_limit",
    "2",
    "--learning_rate",
    "2e-5",
    "--weight_decay",
    "0.",
    "--warmup_ratio",
    "0.03",
    "--lr_scheduler_type",
    "cosine",
    "--logging_strategy",
    "steps",
    "--logging_steps",
    "1",
    "--tf32",
    "True",
    "--model_max_length",
    "2048",
    "--q_lora",
    "False",
    "--gradient_checkpointing",
    "True",
    "--flash_attn",
    "False",
    "--lora_target_modules",
    "q_proj",
    "v_proj",
    "--lora_weight_path",
    "",
    "--lora_bias",
    "none",
]


def test_fastchat_lora_flags_land(gpu_like):
    model, _, train, notices = parse_args(LORA_FLAGS)
    assert train.fp16 is True
    assert (model.lora_r, model.lora_alpha, model.lora_dropout) == (8, 16, 0.05)
    assert model.lora_target_modules == ["q_proj", "v_proj"] and model.lora_bias == "none"
    assert train.activation_checkpointing is True and train.eval_steps == 100
    assert [n for n in notices if "lora" in n] == [
        "--q_lora ignored (4-bit QLoRA (bitsandbytes, CUDA only) is not supported; LoRA on a bf16/fp16 base "
        "is: "
        "--lora_r N with --bf16 True)",
        "--lora_weight_path ignored (FastChat declares it but never reads it)",
    ]
    with pytest.raises(ConfigError) as err:
        parse_args([*LORA_FLAGS, "--q_lora", "True"])
    assert str(err.value) == (
        "--q_lora: 4-bit QLoRA (bitsandbytes, CUDA only) is not supported; LoRA on a bf16/fp16 base is: "
        "--lora_r N "
        "with --bf16 True"
    )
    with pytest.raises(SystemExit):  # argparse's own message names the choices
        parse_args([*LORA_FLAGS, "--lora_bias", "some"])


def test_translate_bool_and_drop():
    argv, notices = translate_flags(
        ["--flash_attn", "True", "--group_by_length", "--save_safetensors", "True", "--x", "1"]
    )
    assert argv == [
        "--attn_implementation",
        "flash_attention_2",
        "--train_sampling_strategy",
        "group_by_length",
        "--x",
        "1",
    ]
    assert len(notices) == 3
    argv, notices = translate_flags(["--flash_attn", "False"])
    assert argv == [] and notices == []
    argv, _ = translate_flags(["--evaluation_strategy=steps"])
    assert argv == ["--eval_strategy", "steps"]


def test_layer_cls_merges_into_given_fsdp_config():
    argv, _ = translate_flags(
        ["--fsdp_config", '{"version": 2}', "--fsdp_transformer_layer_cls_to_wrap", "A,B"]
    )
    assert json.loads(argv[argv.index("--fsdp_config") + 1]) == {
        "version": 2,
        "transformer_layer_cls_to_wrap": ["A", "B"],
    }


def test_yaml_config_with_command_line_override(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "model_name_or_path: m\ndata_path: [a.json, b.jsonl]\nlearning_rate: 1.0e-4\nuse_cpu: true\n"
        "output_dir: out\nloss_mode: last_response\n"
    )
    model, data, train, _ = parse_args(["--config", str(cfg), "--learning_rate", "3e-4"])
    assert model.model_name_or_path == "m" and data.data_path == ["a.json", "b.jsonl"]
    assert train.learning_rate == 3e-4 and train.use_cpu is True and data.loss_mode == "last_response"


def test_bad_config_and_unknown_flags(tmp_path):
    with pytest.raises(ConfigError, match="no such file|No such file"):
        parse_args(["--config", str(tmp_path / "missing.yaml")])
    (tmp_path / "bad.yaml").write_text("a: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_args(["--config", str(tmp_path / "bad.yaml")])
    with pytest.raises(ConfigError, match="unknown arguments: --nonsense 1"):
        parse_args(
            ["--model_name_or_path", "m", "--data_path", "d.json", "--output_dir", "o", "--nonsense", "1"]
        )


# ---- the way a user meets a mistake: `chatsft train ...`, exit code 2, one line on stderr ------------------

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BASE = ["--model_name_or_path", "m", "--data_path", "d.json", "--output_dir", "o"]
no_gpu = pytest.mark.skipif(accelerator_visible(), reason="what a machine without a GPU says")


def train_error(argv, capsys) -> str:
    assert main(["train", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1, captured.err
    return captured.err.removeprefix("chatsft train: error: ").rstrip("\n")


@no_gpu
def test_gpu_recipe_on_cpu_says_every_conflict_once_with_the_flags_to_change(capsys):
    recipe = ["--config", str(EXAMPLES / "vicuna.yaml")]
    assert train_error(recipe, capsys) == (
        "no GPU is visible, and these settings need one: --tf32 True, --fsdp 'full_shard auto_wrap'. To run "
        "this recipe on CPU (a smoke test), add: --tf32 False --fsdp ''"
    )
    flash = [*recipe, "--fp16", "True", "--bf16", "False", "--attn_implementation", "flash_attention_2"]
    assert train_error(flash, capsys) == (
        "no GPU is visible, and these settings need one: --tf32 True, --fp16 True, --fsdp 'full_shard "
        "auto_wrap', --attn_implementation flash_attention_2. To run this recipe on CPU (a smoke test), add: "
        "--tf32 False --fp16 False --fsdp '' --attn_implementation sdpa (bf16 runs on CPU: --bf16 True)"
    )
    # the suggested flags are enough: `--fsdp ''` alone also drops the recipe's fsdp_config; bf16 stays on
    _, _, train, _ = parse_args([*recipe, "--tf32", "False", "--fsdp", ""])
    assert train.use_cpu is True and train.bf16 is True and not train.fsdp and train.fsdp_config is None
    assert train.device_notices == ["no GPU is visible: training on CPU (as with --use_cpu True)"]
    assert train.dataloader_pin_memory is False  # no pin_memory warning from every DataLoader


def test_report_to_without_its_package_names_the_extra(capsys):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    assert train_error([*BASE, "--report_to", "wandb"], capsys) == (
        "--report_to wandb needs a package that is not installed: pip install 'chatsft[wandb]' "
        "(or --report_to none)"
    )


def test_abbreviated_flags_are_unknown_not_guessed(capsys):
    assert train_error([*BASE, "--max_step", "1"], capsys) == (
        "unknown arguments: --max_step 1 (see `chatsft train --help`)"
    )


def test_strategies_print_as_typed(capsys):
    message = train_error(
        [*BASE, "--load_best_model_at_end", "True", "--eval_strategy", "steps", "--save_strategy", "epoch"],
        capsys,
    )
    assert message.endswith("but found Evaluation strategy: steps Save strategy: epoch")
    _, _, train, _ = parse_args([*BASE, "--eval_strategy", "steps"])
    with pytest.raises(ConfigError) as err:
        train.check_eval_set(False)
    assert str(err.value) == (
        "--eval_strategy steps needs an eval set: give --eval_data_path or --train_ratio below 1"
    )
