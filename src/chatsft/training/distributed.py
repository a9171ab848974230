"""Multi-process runs: which layers FSDP wraps, whether FSDP can run, the full weights of a sharded model.

The HF Trainer hands FSDP to accelerate, which applies it only when the processes were started by a launcher
(`torchrun`) on GPU-class devices; anywhere else (CPU, or one plain process) it quietly trains without FSDP,
each process holding the whole model. `check_fsdp_supported` turns that quiet change into a `ConfigError`.
`fill_fsdp_config` writes the decoder layer class into the FSDP settings (detected from the model) so the wrap
is visible and a wrong class name fails before training rather than inside `accelerator.prepare`.
`gather_full_state_dict` is the unsharded state dict of a model sharded with torch's FSDP2 (`fully_shard`),
collected on rank 0 in CPU memory. (Just over 300 lines: the launch, FSDP and gathering checks share the
same view of the process group and the accelerate state.)
"""

from __future__ import annotations

import os
from collections import Counter
from typing import TYPE_CHECKING

from chatsft.errors import ConfigError

if TYPE_CHECKING:
    import torch

TRANSFORMER_WRAP = "TRANSFORMER_BASED_WRAP"
# accelerate's AcceleratorState turns FSDP on only for these distributed types (accelerate/state.py).
FSDP_DISTRIBUTED_TYPES = frozenset(
    {
        "MULTI_GPU",
        "MULTI_MLU",
        "MULTI_SDAA",
        "MULTI_MUSA",
        "MULTI_NPU",
        "MULTI_XPU",
        "MULTI_HPU",
        "MULTI_NEURON",
        "FSDP",
    }
)


def _base_model(model):
    """The transformers model under a peft wrapper (FSDP wraps what is inside)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _class_names(model) -> set[str]:
    return {type(m).__name__ for m in model.modules()}


def decoder_layer_classes(model) -> list[str]:
    """Class names of the model's repeated blocks (e.g. `["LlamaDecoderLayer"]`), for FSDP's auto-wrap.

    The model's own `_no_split_modules`, kept to the classes it actually contains; failing that, the class of
    the largest `ModuleList` made of one repeated class (the decoder stack). Empty when neither is found.
    """
    import torch

    model = _base_model(model)
    present = _class_names(model)
    declared = getattr(model, "_no_split_modules", None) or []
    found = sorted(name for name in declared if name in present)
    if found:
        return found
    best: tuple[int, str] | None = None
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) >= 2:
            kinds = Counter(type(child).__name__ for child in module)
            if len(kinds) == 1 and (best is None or len(module) > best[0]):
                best = (len(module), next(iter(kinds)))
    return [best[1]] if best else []


def fsdp_requested(training_args) -> bool:
    return (
        bool(getattr(training_args, "fsdp", None))
        and getattr(training_args, "fsdp_plugin_args", None) is not None
    )


def fill_fsdp_config(training_args, model) -> list[str]:
    """Set FSDP's `transformer_layer_cls_to_wrap` from the model if FSDP is on and none is given; notices.

    Call after the model is loaded and before `Trainer(...)` (which builds the FSDP plugin from
    `training_args.fsdp_plugin_args`). Class names given by the user are checked against the model: a name the
    model lacks is a `ConfigError` here instead of a ValueError from accelerate after the data is prepared.
    """
    if not fsdp_requested(training_args):
        return []
    config = training_args.fsdp_config if isinstance(training_args.fsdp_config, dict) else {}
    plugin_args = training_args.fsdp_plugin_args
    if plugin_args.get("auto_wrap_policy", TRANSFORMER_WRAP) != TRANSFORMER_WRAP:
        return []
    given = config.get("transformer_layer_cls_to_wrap")
    if isinstance(given, str):
        given = [c for c in given.replace(",", " ").split() if c]
    present = _class_names(_base_model(model))
    if given:
        missing = [name for name in given if name not in present]
        if missing:
            detected = decoder_layer_classes(model)
            hint = (
                f"its decoder layer class is {', '.join(detected)} (leave transformer_layer_cls_to_wrap out "
                "and chatsft finds it)"
                if detected
                else "name a class the model has"
            )
            raise ConfigError(
                f"--fsdp_config transformer_layer_cls_to_wrap names {', '.join(missing)}, which this model "
                f"({type(_base_model(model)).__name__}) does not have; {hint}"
            )
        plugin_args["transformer_cls_names_to_wrap"] = ",".join(given)
        return [f"FSDP: each {', '.join(given)} is one shard unit"]
    detected = decoder_layer_classes(model)
    if not detected:
        return [
            f"FSDP: no repeated decoder layer found in {type(_base_model(model)).__name__}; the whole model "
            "is one shard unit (name the block class in --fsdp_config transformer_layer_cls_to_wrap to save "
            "memory)"
        ]
    config["transformer_layer_cls_to_wrap"] = detected
    training_args.fsdp_config = config
    plugin_args["transformer_cls_names_to_wrap"] = ",".join(detected)
    return [f"FSDP: each {', '.join(detected)} is one shard unit (detected from the model)"]


def fsdp_problem(
    distributed_type: str, *, use_cpu: bool, accelerator_available: bool, num_processes: int
) -> str | None:
    """Why FSDP would not run for this process setup (accelerate's decision), or None when it would.

    `distributed_type` is the name of accelerate's `DistributedType` (e.g. "MULTI_GPU", "MULTI_CPU", "NO").
    """
    if distributed_type in FSDP_DISTRIBUTED_TYPES:
        return None
    fallback = "the HF Trainer would silently train without it, every process holding the whole model"
    if distributed_type == "MULTI_CPU" or use_cpu or not accelerator_available:
        where = f"{num_processes} CPU processes" if distributed_type == "MULTI_CPU" else "one CPU process"
        why = "--use_cpu is set" if use_cpu else "no GPU is visible"
        return (
            f"--fsdp needs GPUs, but this run is {where} ({why}): {fallback} (plain DDP). Drop --fsdp (and "
            "--fsdp_config) to train on CPU, or run on GPUs under torchrun."
        )
    if distributed_type == "NO":
        return (
            f"--fsdp needs a launcher: started as one plain process, {fallback}. Start it with "
            "`torchrun --nproc_per_node=N -m chatsft.train ...` (N=1 works for one GPU)."
        )
    return f"--fsdp cannot run with accelerate's distributed type {distributed_type}: {fallback}."


def check_fsdp_supported(training_args) -> None:
    """Raise `ConfigError` when FSDP is requested where accelerate would not apply it (CPU, no launcher), or
    with options the Trainer would refuse after the model is loaded (FSDP's and the Trainer's activation
    checkpointing both on; `--save_only_model` with sharded checkpoints).

    Reads `training_args.distributed_state`, which transformers sets up on first use of `training_args.device`
    (this initializes the process group under torchrun, as the Trainer would). A no-op without `--fsdp`, and
    for the XLA FSDP path (`fsdp_config["xla"]`), which transformers handles itself.
    """
    if not getattr(training_args, "fsdp", None):
        return
    config = training_args.fsdp_config if isinstance(training_args.fsdp_config, dict) else {}
    if config.get("xla"):
        return
    # Two combinations the Trainer refuses only once the model is loaded: refuse them now.
    if str(config.get("activation_checkpointing", False)).lower() == "true" and getattr(
        training_args, "activation_checkpointing", False
    ):
        raise ConfigError(
            "--fsdp_config activation_checkpointing and --activation_checkpointing (FastChat's "
            "--gradient_checkpointing) are both on: keep one; FSDP's own (in --fsdp_config) saves an "
            "all-gather"
        )
    state_dict_type = str((training_args.fsdp_plugin_args or {}).get("state_dict_type", ""))
    if getattr(training_args, "save_only_model", False) and "SHARDED_STATE_DICT" in state_dict_type:
        raise ConfigError(
            "--save_only_model cannot be used with FSDP state_dict_type SHARDED_STATE_DICT: set "
            "FULL_STATE_DICT in --fsdp_config, or drop --save_only_model"
        )
    import torch

    training_args.device  # noqa: B018 - sets up training_args.distributed_state
    state = training_args.distributed_state
    kind = getattr(state.distributed_type, "name", str(state.distributed_type).rsplit(".", 1)[-1])
    problem = fsdp_problem(
        kind,
        use_cpu=bool(training_args.use_cpu)
        or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"),
        accelerator_available=torch.cuda.is_available()
        or (getattr(state, "device", None) is not None and state.device.type not in ("cpu", "mps")),
        num_processes=int(getattr(state, "num_processes", 1)),
    )
    if problem:
        raise ConfigError(problem)


def accelerator_visible() -> bool:
    """Whether torch sees a GPU-class device (CUDA, ROCm, XPU, MPS, ...) or transformers an XLA one."""
    import torch
    from transformers.utils import is_torch_xla_available

    accelerator = getattr(torch, "accelerator", None)
    visible = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    return bool(visible) or is_torch_xla_available()


def choose_cpu(training_args) -> str | None:
    """With no GPU visible and no `--use_cpu`, set `use_cpu` (call before the device is set up); a notice.

    Without it, torchrun on a CPU machine gives every process a world of one (see `check_launch`), and a
    single process refuses `--bf16` and asks DataLoader to pin memory it cannot pin. With it, accelerate joins
    the processes into one gloo run, and bf16 runs through CPU autocast.
    """
    if training_args.use_cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"):
        return None
    if accelerator_visible():
        return None
    training_args.use_cpu = True
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    where = f"{launched} CPU processes joined over gloo" if launched > 1 else "training on CPU"
    return f"no GPU is visible: {where} (as with --use_cpu True)"


def _flag(value) -> str:
    import shlex

    text = " ".join(value) if isinstance(value, (list, tuple)) else str(value)
    return shlex.quote(text)


def gpu_only_settings(namespace) -> list[tuple[str, str]]:
    """The parsed flags (an argparse namespace of all three dataclasses) that need a GPU, as (given, change
    to).

    Checked together before the arguments become dataclasses, since `TrainingArguments.__post_init__` and the
    model loader would refuse them one at a time (tf32, then fsdp, then fp16 inside the Trainer, then flash
    attention after the data is encoded).
    """
    from transformers.utils import is_torch_tf32_available

    get = namespace.__dict__.get
    found = []
    if get("tf32") and not is_torch_tf32_available():
        found.append(("--tf32 True", "--tf32 False"))
    if get("fp16") or get("fp16_full_eval"):
        found.append(("--fp16 True", "--fp16 False (bf16 runs on CPU: --bf16 True)"))
    if get("fsdp"):
        found.append((f"--fsdp {_flag(get('fsdp'))}", "--fsdp ''"))
    if get("deepspeed"):
        found.append((f"--deepspeed {_flag(get('deepspeed'))}", "--deepspeed ''"))
    attn = get("attn_implementation") or ""
    if "flash" in attn:
        found.append((f"--attn_implementation {attn}", "--attn_implementation sdpa"))
    return found


def check_gpu_settings(namespace) -> None:
    """Raise one `ConfigError` listing every setting that needs a GPU when none will be used, with the fix."""
    cpu = bool(namespace.__dict__.get("use_cpu")) or not accelerator_visible()
    found = gpu_only_settings(namespace) if cpu else []
    if not found:
        return
    why = "--use_cpu is set" if namespace.__dict__.get("use_cpu") else "no GPU is visible"
    raise ConfigError(
        f"{why}, and {'this setting needs' if len(found) == 1 else 'these settings need'} one: "
        + ", ".join(given for given, _ in found)
        + ". To run this recipe on CPU (a smoke test), add: "
        + " ".join(change.split(" (")[0] for _, change in found)
        + "".join(f" ({change.split(' (', 1)[1]}" for _, change in found if " (" in change)
    )


def check_launch(training_args) -> None:
    """Raise `ConfigError` when the launcher started processes that accelerate did not join into one run.

    Under `torchrun` on a machine without GPUs and without `--use_cpu`, accelerate sees no device to
    distribute over and gives every process a world of one: each trains its own copy on all the data and they
    overwrite each other's checkpoints. (With `--use_cpu True` they form one gloo DDP run.)
    """
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    training_args.device  # noqa: B018 - sets up training_args.distributed_state
    joined = training_args.world_size
    if launched > 1 and joined != launched:
        hint = (
            "no GPU is visible: add --use_cpu True to train on CPU with gloo"
            if not getattr(training_args, "use_cpu", False)
            else "check the launcher's settings"
        )
        raise ConfigError(
            f"the launcher started {launched} processes but they form a run of {joined}: each would train "
            f"alone and overwrite the others' checkpoints; {hint}"
        )


def gather_full_state_dict(model) -> dict[str, torch.Tensor] | None:
    """The full (unsharded) state dict, on CPU, on rank 0; None on the other ranks.

    Works for a model sharded with torch's FSDP2 (`fully_shard`; its DTensor shards are all-gathered, so every
    rank must call this) and for a plain model in a single process, where CPU tensors may share storage with
    the model's parameters, as `model.state_dict()` does. Keys are the model's own, tensors keep their dtype.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    distributed = dist.is_available() and dist.is_initialized()
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if distributed and dist.get_rank() != 0:
        return None
    return {name: tensor.detach().cpu() for name, tensor in state.items()}
