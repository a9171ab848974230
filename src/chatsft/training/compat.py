"""FastChat-era flags -> today's flags, as one table.

FastChat's scripts were written for transformers 4.x; transformers 5 renamed or removed some of the flags they
pass. Each is rewritten here with one notice, so `torchrun -m chatsft.train <FastChat flags>` keeps working.
"""

from __future__ import annotations

import json

from chatsft.errors import ConfigError

# old flag -> (new flag or None to drop, how the value maps, why). Value maps: "same" keeps the value; "bool"
# turns `--old [True]` into `--new VALUE` (VALUE given as the 4th item); "layer_cls" merges into fsdp_config;
# "drop" ignores the flag; "refuse_true" is a one-line error when the flag is true (dropped when false).
# FastChat's `--fsdp "full_shard auto_wrap"` passes through: transformers 5.x still maps it onto fsdp_config
# itself.
FLAG_TABLE: dict[str, tuple[str | None, str, str, str | None]] = {
    "--evaluation_strategy": ("--eval_strategy", "same", "renamed in transformers 4.46", None),
    "--warmup_ratio": (
        "--warmup_steps",
        "same",
        "transformers 5 takes a ratio in [0, 1) as --warmup_steps",
        None,
    ),
    "--no_cuda": ("--use_cpu", "same", "renamed in transformers 4.34", None),
    "--per_gpu_train_batch_size": ("--per_device_train_batch_size", "same", "renamed", None),
    "--per_gpu_eval_batch_size": ("--per_device_eval_batch_size", "same", "renamed", None),
    "--group_by_length": (
        "--train_sampling_strategy",
        "bool",
        "transformers 5 spells it this way",
        "group_by_length",
    ),
    "--flash_attn": (
        "--attn_implementation",
        "bool",
        "FastChat's monkey patch is transformers' own kernel now",
        "flash_attention_2",
    ),
    "--gradient_checkpointing": ("--activation_checkpointing", "same", "renamed in transformers 5", None),
    "--gradient_checkpointing_kwargs": (
        "--activation_checkpointing_kwargs",
        "same",
        "renamed in transformers 5",
        None,
    ),
    "--fsdp_transformer_layer_cls_to_wrap": (None, "layer_cls", "moved into --fsdp_config", None),
    "--save_safetensors": (None, "drop", "weights are always saved as safetensors", None),
    "--logging_dir": (
        None,
        "drop",
        "removed in transformers 5 (TensorBoard reads TENSORBOARD_LOGGING_DIR)",
        None,
    ),
    # fastchat/train/train_lora.py
    "--lora_weight_path": (None, "drop", "FastChat declares it but never reads it", None),
    "--q_lora": (
        None,
        "refuse_true",
        "4-bit QLoRA (bitsandbytes, CUDA only) is not supported; LoRA on a bf16/fp16 "
        "base is: --lora_r N with --bf16 True",
        None,
    ),
}

_FALSE = {"false", "0", "no"}


def translate_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """Rewrite FastChat-era flags in `argv`; return the new argv and one notice per rewritten flag."""
    out: list[str] = []
    notices: list[str] = []
    fsdp_extra: dict = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, _, inline = arg.partition("=")
        entry = FLAG_TABLE.get(name) if name.startswith("--") else None
        if entry is None:
            out.append(arg)
            i += 1
            continue
        new, mapping, why, bool_value = entry
        values = [inline] if inline else []
        i += 1
        while not inline and i < len(argv) and not argv[i].startswith("--"):
            values.append(argv[i])
            i += 1
        if mapping == "same":
            out += [new, *values]
            notices.append(f"{name} -> {new} ({why})")
        elif mapping == "bool":
            if not values or values[0].lower() not in _FALSE:
                out += [new, bool_value]
                notices.append(f"{name} -> {new} {bool_value} ({why})")
        elif mapping == "layer_cls":
            classes = [c for v in values for c in v.replace(",", " ").split()]
            fsdp_extra["transformer_layer_cls_to_wrap"] = classes
            notices.append(
                f"{name} {' '.join(values)} -> --fsdp_config transformer_layer_cls_to_wrap ({why})"
            )
        elif mapping == "refuse_true" and (not values or values[0].lower() not in _FALSE):
            raise ConfigError(f"{name}: {why}")
        else:
            notices.append(f"{name} ignored ({why})")
    if fsdp_extra:
        out = _merge_fsdp_config(out, fsdp_extra)
    return out, notices


def _merge_fsdp_config(argv: list[str], extra: dict) -> list[str]:
    if "--fsdp_config" not in argv:
        return argv + ["--fsdp_config", json.dumps(extra)]
    i = argv.index("--fsdp_config")
    value = argv[i + 1]
    if value.lstrip().startswith("{"):
        config = json.loads(value)
    else:
        with open(value, encoding="utf-8") as f:
            config = json.load(f)
    for key, value in extra.items():
        config.setdefault(key, value)
    return argv[:i] + ["--fsdp_config", json.dumps(config)] + argv[i + 2 :]
