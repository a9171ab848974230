"""The final save: written to a hidden folder, reloaded and checked, then moved into `output_dir`.

The model is written by `trainer.save_model` (which already gathers FSDP full state dicts and ZeRO-3 16-bit
weights) into `output_dir/.chatsft-final-tmp`, completed with the tokenizer carrying the training chat
template, a generation config that stops on the end-of-turn ids and `use_cache: true`, then reloaded with
`AutoModelForCausalLM`/`AutoTokenizer` and compared with the in-memory model (every tensor) and the training
text. Only then are the files moved, one `os.replace` at a time, into `output_dir`, under the marker
`chatsft-final.json`. Every rank takes part (the gathers are collectives); only the writer rank writes.
(Over 300 lines: writing, reloading, comparing and moving into place are one transaction.)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from chatsft.errors import ChatsftError, ConfigError
from chatsft.training.checkpoint import WEIGHT_FILE_RE, fsync_path, list_files, write_atomic

logger = logging.getLogger("chatsft")

FINAL_MARKER_NAME = "chatsft-final.json"
FINAL_TMP_NAME = ".chatsft-final-tmp"
MERGED_SUBDIR = "merged"


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _finish_model_folder(
    folder: Path, model, tokenizer, chat_template: str, stop_token_ids: Sequence[int]
) -> None:
    """Tokenizer with the training chat template, generation config that stops at end of turn, use_cache
    on."""
    import copy

    from transformers import GenerationConfig

    old_template = tokenizer.chat_template
    tokenizer.chat_template = chat_template
    try:
        tokenizer.save_pretrained(folder)
    finally:
        tokenizer.chat_template = old_template

    base = getattr(model, "get_base_model", lambda: model)()
    gen = copy.deepcopy(
        getattr(base, "generation_config", None) or GenerationConfig.from_model_config(base.config)
    )
    eos = []
    for i in [*_as_id_list(gen.eos_token_id), *_as_id_list(tokenizer.eos_token_id), *stop_token_ids]:
        if i not in eos:
            eos.append(int(i))
    gen.eos_token_id = eos[0] if len(eos) == 1 else eos
    if gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    gen.save_pretrained(folder)

    config_path = folder / "config.json"
    if config_path.is_file():  # an adapter folder has no config.json
        config = json.loads(config_path.read_text())
        config["use_cache"] = True  # training turns it off for gradient checkpointing; inference wants it
        if isinstance(config.get("text_config"), dict):
            config["text_config"]["use_cache"] = True
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _same_bits(got, want) -> bool:
    """Exact equality, bit for bit: a NaN equals the same NaN (torch.equal says NaN != NaN)."""
    import torch

    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    if got.numel() == 0:
        return True
    return torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))


def _nan_count(tensor) -> int:
    import torch

    return int(torch.isnan(tensor).sum()) if tensor.is_floating_point() else 0


def _compare_state_dicts(saved: Mapping, expected: Mapping, where: Path) -> None:
    missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or extra:
        raise RuntimeError(
            f"final model in {where}: tensors missing on reload {missing[:5]}, unexpected {extra[:5]}"
        )
    for name, tensor in expected.items():
        got = saved[name].detach().cpu()
        want = tensor.detach().cpu().contiguous()
        if not _same_bits(got.contiguous(), want):
            nans = _nan_count(want)
            raise RuntimeError(
                f"final model in {where}: tensor {name} differs from the trained model after reload"
                + (f" (the trained tensor holds {nans} NaN values)" if nans else "")
            )
        if nans := _nan_count(want):
            logger.warning("the final model's tensor %s holds %d NaN values (saved as trained)", name, nans)


def _verify_folder(
    folder: Path,
    expected_state: Mapping | None,
    is_adapter: bool,
    chat_template: str,
    stop_token_ids: Sequence[int],
    check_text,
    trust_remote_code: bool = False,
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if expected_state is not None:
        if is_adapter:
            from safetensors.torch import load_file

            _compare_state_dicts(load_file(folder / "adapter_model.safetensors"), expected_state, folder)
        else:
            reloaded = AutoModelForCausalLM.from_pretrained(
                folder, dtype="auto", device_map="cpu", trust_remote_code=trust_remote_code
            )
            _compare_state_dicts(reloaded.state_dict(), expected_state, folder)
            if reloaded.config.use_cache is not True:
                raise RuntimeError(f"final model in {folder}: config.use_cache is not True")
            del reloaded
    eos = _as_id_list(GenerationConfig.from_pretrained(folder).eos_token_id)
    if not set(stop_token_ids) <= set(eos):
        raise RuntimeError(
            f"final model in {folder}: generation_config eos_token_id {eos} lacks {list(stop_token_ids)}"
        )
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if tokenizer.chat_template != chat_template:
        raise RuntimeError(f"final model in {folder}: the saved tokenizer lost the chat template")
    if check_text is not None:
        messages, text = check_text
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        if rendered != text:
            at = next(
                (i for i, (a, b) in enumerate(zip(rendered, text)) if a != b), min(len(rendered), len(text))
            )
            raise ConfigError(
                "the chat template saved with the model renders a sample differently from training, from "
                f"character {at}: {rendered[at : at + 40]!r} instead of {text[at : at + 40]!r}"
            )


def _move_into_place(tmp: Path, out: Path) -> None:
    """Replace the final model in `out` by the files in `tmp`, one os.replace each, under a final marker."""
    marker = out / FINAL_MARKER_NAME
    try:
        old_files = set(json.loads(marker.read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        old_files = set()
    new_files = list_files(tmp)
    marker.unlink(missing_ok=True)  # from here until the new marker lands, the folder says it is incomplete
    fsync_path(out)
    for rel in new_files:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / rel, out / rel)
    stale = old_files | {p.name for p in out.iterdir() if p.is_file() and WEIGHT_FILE_RE.match(p.name)}
    for rel in sorted(stale - set(new_files)):
        (out / rel).unlink(missing_ok=True)
    files = {rel: {"size": (out / rel).stat().st_size} for rel in new_files}
    write_atomic(marker, json.dumps({"format": "chatsft-final/1", "files": files}, indent=1).encode())
    shutil.rmtree(tmp, ignore_errors=True)


def _all_ranks_ok(ok: bool) -> bool:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return ok
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, ok)
    return all(flags)


def _save_full_model(trainer, folder: Path) -> None:
    """`trainer.save_model`, which gathers FSDP and ZeRO-3 weights, with FSDP switched to a full state
    dict."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None) if trainer.is_fsdp_enabled else None
    if plugin is None or "FULL_STATE_DICT" in str(plugin.state_dict_type):
        trainer.save_model(str(folder))
        return
    from torch.distributed.fsdp import StateDictType

    # FSDP2 defaults to SHARDED_STATE_DICT, under which save_model writes no weights at all.
    old, plugin.state_dict_type = plugin.state_dict_type, StateDictType.FULL_STATE_DICT
    try:
        trainer.save_model(str(folder))
    finally:
        plugin.state_dict_type = old


def _reference_state_dict(trainer) -> Mapping:
    """The trained weights to compare the saved ones with: gathered (a collective) when they are sharded."""
    accelerator = trainer.accelerator
    zero3 = (
        trainer.is_deepspeed_enabled and accelerator.deepspeed_config["zero_optimization"].get("stage") == 3
    )
    if trainer.is_fsdp_enabled or zero3:
        try:
            return accelerator.get_state_dict(trainer.deepspeed if zero3 else trainer.model)
        except ValueError as exc:  # ZeRO-3 without stage3_gather_16bit_weights_on_model_save
            raise ConfigError(f"cannot gather the final weights: {exc}") from exc
    return accelerator.unwrap_model(trainer.model).state_dict() if trainer.args.should_save else {}


def save_final(
    trainer,
    tokenizer,
    output_dir: str | os.PathLike | None = None,
    *,
    chat_template: str,
    stop_token_ids: Sequence[int],
    extra_files: Mapping[str, bytes | str] | None = None,
    check_text: tuple[list[dict], str] | None = None,
    merge: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Save the trained model into `output_dir` (default `trainer.args.output_dir`), checked, and return that
    path.

    Call on every rank (the weights are gathered collectively). The writer rank (`args.should_save`) builds
    the model in `output_dir/.chatsft-final-tmp` with `trainer.save_model` (which gathers FSDP full state
    dicts and DeepSpeed ZeRO-3 16-bit weights), adds the tokenizer with `chat_template`, a generation config
    whose eos_token_id includes `stop_token_ids`, `use_cache=True`, `trainer_state.json` and `extra_files`
    (name -> content); reloads it with AutoModelForCausalLM/AutoTokenizer, checks every tensor equals the
    trained one exactly and that `apply_chat_template(check_text[0], tokenize=False) == check_text[1]`; then
    moves the files into `output_dir` one `os.replace` at a time, deletes the previous final model's leftover
    weight files, and writes `chatsft-final.json`. Any failure leaves `output_dir` as it was and raises on
    every rank.

    A peft model is saved as its adapter; with `merge=True` a merged full model also goes to
    `output_dir/merged`. `trust_remote_code` is passed to the reload (a model whose class lives in its
    folder's own Python files).
    """
    out = Path(output_dir if output_dir is not None else trainer.args.output_dir)
    tmp = out / FINAL_TMP_NAME
    accelerator = trainer.accelerator
    writer = trainer.args.should_save
    model = accelerator.unwrap_model(trainer.model)
    is_adapter = hasattr(model, "peft_config")
    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    if merge and is_adapter and sharded:
        raise ConfigError(
            "--merge cannot run under FSDP/DeepSpeed: merge the saved adapter in a separate step"
        )
    if writer:
        shutil.rmtree(tmp, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    error: BaseException | None = None
    try:
        _save_full_model(trainer, tmp)
        state = _reference_state_dict(trainer)
        if writer:
            if is_adapter:
                from peft import get_peft_model_state_dict

                state = get_peft_model_state_dict(model, state_dict=state)
            _finish_model_folder(tmp, model, tokenizer, chat_template, stop_token_ids)
            trainer.state.save_to_json(str(tmp / "trainer_state.json"))
            for name, content in (extra_files or {}).items():
                if Path(name).name != name or name.startswith("."):
                    raise ValueError(f"extra file name {name!r} must be a plain file name")
                (tmp / name).write_bytes(content.encode() if isinstance(content, str) else content)
            _verify_folder(
                tmp, state, is_adapter, chat_template, stop_token_ids, check_text, trust_remote_code
            )
            del state
            if merge and is_adapter:
                import copy

                merged = copy.deepcopy(model).merge_and_unload()  # the trained model keeps its adapter
                merged.save_pretrained(tmp / MERGED_SUBDIR)
                _finish_model_folder(tmp / MERGED_SUBDIR, merged, tokenizer, chat_template, stop_token_ids)
                _verify_folder(
                    tmp / MERGED_SUBDIR,
                    merged.state_dict(),
                    False,
                    chat_template,
                    stop_token_ids,
                    check_text,
                    trust_remote_code,
                )
                del merged
    except Exception as exc:
        error = exc
    if not _all_ranks_ok(error is None):
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is not None:
            raise error
        raise ChatsftError(
            "the final save failed on another process (see its message); the output folder is unchanged"
        )
    if writer:
        _move_into_place(tmp, out)
    accelerator.wait_for_everyone()
    return out


def save_run(
    trainer, tokenizer, encoder, split, output_dir: Path, model_args=None, manifest: dict | None = None
) -> Path:
    """`save_final` for a finished `chatsft train` run: the encoder's template as the chat template, its stop
    ids, the audit, the run manifest and the loss curve beside the weights, and one training conversation to
    check the template with. `model_args` gives --merge_lora and --trust_remote_code."""
    import tempfile

    from chatsft.templates import render_text
    from chatsft.training.model import restore_use_cache
    from chatsft.training.plot import plot_loss

    restore_use_cache(trainer.model)
    template, check = encoder.template, None
    if split.sample is not None:
        messages = split.sample.messages
        messages = messages[: max(i for i, m in enumerate(messages) if m["role"] == "assistant") + 1]
        check = (messages, render_text(template, messages, bos=tokenizer.bos_token, eos=tokenizer.eos_token))
    extra = {"audit.json": split.audit_json()}
    if manifest is not None:
        from chatsft.training.checkpoint import RUN_FILE

        extra[RUN_FILE] = json.dumps(manifest, indent=1)
    with tempfile.TemporaryDirectory() as tmp:
        extra["loss.png"] = plot_loss(trainer.state.log_history, Path(tmp) / "loss.png").read_bytes()
    return save_final(
        trainer,
        tokenizer,
        output_dir,
        chat_template=template.jinja(),
        stop_token_ids=list(encoder.stop_ids),
        extra_files=extra,
        check_text=check,
        merge=bool(getattr(model_args, "merge_lora", False)),
        trust_remote_code=bool(getattr(model_args, "trust_remote_code", False)),
    )
