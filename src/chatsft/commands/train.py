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

    from chatsft.training import steps
    from chatsft.training.config import parse_args
    from chatsft.training.final import save_run
    from chatsft.training.manifest import attach_manifest, resolve_run, run_manifest
    from chatsft.training.notices import announce, setup_notices
    from chatsft.training.preempt import finishing_save, preemptible, rerun_hint
    from chatsft.training.reporting import run_summary
    from chatsft.training.space import disk_full_is_one_line
    from chatsft.training.trainer import build_trainer

    model_args, data_args, args, flag_notices = parse_args(argv)
    say = setup_notices(args.should_log)
    announce(say, [*(f"flag: {notice}" for notice in flag_notices), *args.device_notices])
    transformers.set_seed(args.seed)
    announce(say, steps.check_run(model_args, data_args, args))
    tokenizer, encoder, notices = steps.tokenizer_and_encoder(model_args, data_args, args)
    announce(say, notices)
    plan = steps.data_plan(encoder, data_args, args)
    manifest = run_manifest(model_args, data_args, args, encoder, plan)
    resume, notices, finished = resolve_run(args.output_dir, manifest, args=args, writer=args.should_save)
    announce(
        say, [*notices, "" if finished else f"resuming from {resume}" if resume else "starting from step 0"]
    )
    if finished:
        return 0

    split = steps.datasets(plan, data_args, args)
    announce(say, split.notices, gather=True)
    announce(say, split.audit_notices())
    args.check_eval_set(split.eval is not None)
    model, notices = steps.model_for(tokenizer, model_args, args)
    announce(say, notices)
    flash = (model_args.attn_implementation or "").startswith("flash")
    trainer, notices = build_trainer(
        model, tokenizer, args, data_args, split, flash=flash, stop_ids=encoder.stop_ids
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
