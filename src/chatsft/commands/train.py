"""`chatsft train` / `python -m chatsft.train` / `torchrun -m chatsft.train`: one program.

parse -> resume point -> tokenizer and template -> data (validated, encoded, audited) -> model -> Trainer ->
train -> verified save. The tokenizer and the data come before the weights so that data mistakes cost seconds.
Under torchrun only rank 0 writes files (rejected records, audit, checkpoints' shared parts, the final model).
A SIGTERM during training ends it at the next step boundary with a complete checkpoint and exit code 143
(`chatsft.training.preempt`); the same command then resumes from it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from chatsft.errors import ChatsftError


def main(argv: list[str] | None = None) -> int:
    import transformers

    from chatsft.data import build_datasets
    from chatsft.tokenizer import load_encoder, prepare_tokenizer
    from chatsft.training.config import parse_args
    from chatsft.training.distributed import check_fsdp_supported, check_launch, fill_fsdp_config
    from chatsft.training.final import save_run
    from chatsft.training.lock import acquire_run_lock
    from chatsft.training.lora import apply_lora
    from chatsft.training.manifest import attach_manifest, resolve_run, run_manifest
    from chatsft.training.model import load_config, load_model_for
    from chatsft.training.notices import announce, setup_notices
    from chatsft.training.preempt import finishing_save, preemptible, rerun_hint
    from chatsft.training.preflight import run_preflight
    from chatsft.training.reporting import run_summary
    from chatsft.training.space import disk_full_is_one_line
    from chatsft.training.trainer import build_trainer

    model_args, data_args, args, flag_notices = parse_args(argv)
    say = setup_notices(args.should_log)
    announce(say, [*(f"flag: {notice}" for notice in flag_notices), *args.device_notices])
    transformers.set_seed(args.seed)
    check_launch(args)
    check_fsdp_supported(args)
    announce(
        say,
        run_preflight(
            output_dir=args.output_dir,
            data_paths=[source.path for source in data_args.sources],
            eval_data_paths=data_args.eval_data_path or (),
            model_path=model_args.model_name_or_path,
            dtype=model_args.load_dtype(args),
            save_only_model=args.save_only_model,
            lora=model_args.lora_r > 0,
        ),
    )
    announce(say, acquire_run_lock(args.output_dir, writer=args.should_save))

    config = load_config(model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code)
    announce(say, args.fill_model_max_length(config))
    tokenizer, preset, notices = prepare_tokenizer(
        model_args.model_name_or_path,
        model_max_length=args.model_max_length,
        config=config,
        tokenizer_path=model_args.tokenizer_name_or_path,
        model_family=model_args.model_family,
        trust_remote_code=model_args.trust_remote_code,
        padding_side=model_args.padding_side,
        extra_special_tokens=model_args.add_special_tokens,
    )
    encoder, more = load_encoder(
        model_args.model_name_or_path,
        conv_template=data_args.conv_template,
        loss_mode=data_args.loss_mode,
        model_max_length=args.model_max_length,
        tokenizer=tokenizer,
        preset=preset,
    )
    announce(say, [*notices, *more])
    manifest = run_manifest(model_args, data_args, args, encoder)
    resume, notices, finished = resolve_run(args.output_dir, manifest, args=args, writer=args.should_save)
    announce(
        say, [*notices, "" if finished else f"resuming from {resume}" if resume else "starting from step 0"]
    )
    if finished:
        return 0

    split = build_datasets(
        encoder,
        sources=data_args.sources,
        eval_data_path=data_args.eval_data_path,
        train_ratio=data_args.train_ratio,
        seed=args.data_seed if args.data_seed is not None else args.seed,
        lazy=data_args.lazy_preprocess,
        num_workers=data_args.preprocessing_num_workers,
        cache_dir=args.cache_dir,
        policy=data_args.read_policy(Path(args.output_dir) if args.should_save else None),  # one writer
        progress=args.should_log and not args.disable_tqdm,
    )
    announce(say, split.notices, gather=True)
    announce(say, split.audit_notices())
    args.check_eval_set(split.eval is not None)

    model, grew, notices = load_model_for(
        tokenizer,
        model_args.model_name_or_path,
        dtype=model_args.load_dtype(args),
        attn_implementation=model_args.attn_implementation,
        trust_remote_code=model_args.trust_remote_code,
        model_max_length=args.model_max_length,
        gradient_checkpointing=args.activation_checkpointing,
    )
    announce(say, notices)
    if model_args.lora_r > 0:
        model, notice = apply_lora(
            model,
            r=model_args.lora_r,
            alpha=model_args.lora_alpha,
            dropout=model_args.lora_dropout,
            target_modules=model_args.lora_target_modules,
            train_embeddings=grew,
            bias=model_args.lora_bias,
        )
        announce(say, [notice])
    announce(say, fill_fsdp_config(args, model))

    trainer, notices = build_trainer(
        model,
        tokenizer,
        args,
        data_args,
        split,
        flash=(model_args.attn_implementation or "").startswith("flash"),
        stop_ids=encoder.stop_ids,
    )
    announce(say, notices)
    attach_manifest(trainer, manifest)
    rerun = rerun_hint(args.overwrite_output_dir)
    with disk_full_is_one_line(args.output_dir, rerun=rerun), preemptible(trainer) as preemption:
        result = trainer.train(resume_from_checkpoint=resume)
    if preemption.stopped_at is not None:
        say(preemption.farewell(args.output_dir, args.overwrite_output_dir))
        return preemption.exit_code
    with disk_full_is_one_line(args.output_dir, rerun=rerun), finishing_save(say):  # a SIGTERM waits for it
        announce(say, run_summary(trainer, result, evaluate=split.eval is not None))
        final = save_run(trainer, tokenizer, encoder, split, Path(args.output_dir), model_args, manifest)
    say(f"saved the final model to {final} (loads with AutoModelForCausalLM/AutoTokenizer; curve: loss.png)")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """`python -m chatsft.train`: user mistakes print one line and exit non-zero, without a traceback."""
    try:
        return main(argv)
    except ChatsftError as err:
        print(f"chatsft train: error: {err}", file=sys.stderr)
        return err.exit_code
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Destroy the process group before exiting: left to interpreter shutdown, gloo's threads can abort a rank
    that has finished cleanly (SIGABRT, "terminate called without an active exception")."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(cli())
