"""`chatsft train` / `python -m chatsft.train` / `torchrun -m chatsft.train`: one program.

parse -> resume point -> tokenizer and template -> data (validated, encoded, audited) -> model -> Trainer ->
train -> verified save. The tokenizer and the data come before the weights so that data mistakes cost seconds.
Under torchrun only rank 0 writes files (rejected records, audit, checkpoints' shared parts, the final model).
A SIGTERM during training ends it at the next step boundary with a complete checkpoint and exit code 143
(`chatsft.preempt`); the same command then resumes from it.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import tempfile
from pathlib import Path

from chatsft.errors import ChatsftError

logger = logging.getLogger("chatsft")


def main(argv: list[str] | None = None) -> int:
    from chatsft.config import parse_args

    model_args, data_args, args, notices = parse_args(argv)
    say = _sayer(args)
    for notice in notices:
        say(f"flag: {notice}")
    return run(model_args, data_args, args, say)


def run(model_args, data_args, args, say) -> int:
    import transformers

    from chatsft.checkpoint import CheckpointMarker, choose_resume
    from chatsft.collate import PackedCollator, PackedDataset, PadCollator
    from chatsft.data import build_datasets
    from chatsft.distributed import check_fsdp_supported, check_launch, fill_fsdp_config, other_ranks_notices
    from chatsft.encode import Encoder, loss_mode_from_flags
    from chatsft.lora import apply_lora
    from chatsft.metrics import CountingCollator, ThroughputCallback
    from chatsft.model import load_config, load_model_for, prepare_tokenizer
    from chatsft.preempt import PreemptionCallback
    from chatsft.preflight import check_template_tokens, run_preflight
    from chatsft.records import ReadPolicy
    from chatsft.templates import get_template
    from chatsft.trainer import ChatTrainer

    transformers.set_seed(args.seed)
    loss_mode = loss_mode_from_flags(data_args.loss_mode, data_args.efficient_loss, data_args.last_response_loss,
                                     data_args.split_example_loss)
    if data_args.packing and data_args.lazy_preprocess:
        raise ChatsftError("--packing needs every example's length up front: drop --lazy_preprocess")
    check_launch(args)
    check_fsdp_supported(args)
    for notice in run_preflight(
        output_dir=args.output_dir, data_paths=data_args.data_path, eval_data_paths=data_args.eval_data_path or (),
        model_path=model_args.model_name_or_path, dtype=_dtype(args, model_args), save_only_model=args.save_only_model,
        lora=model_args.lora_r > 0,
    ):
        say(notice)
    output_dir = Path(args.output_dir)
    resume, resume_notices = choose_resume(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
    for notice in resume_notices:
        say(notice)
    say(f"resuming from {resume}" if resume else "starting from step 0")

    config = load_config(model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code)
    if args.model_max_length is None:  # FastChat defaults to 512; the model's own context is what users expect
        args.model_max_length = getattr(config, "max_position_embeddings", None) or 2048
        say(f"--model_max_length not given: using the model's context, {args.model_max_length} tokens")
    tokenizer, preset, _, notices = prepare_tokenizer(
        model_args.model_name_or_path, model_max_length=args.model_max_length,
        tokenizer_path=model_args.tokenizer_name_or_path, model_family=model_args.model_family,
        trust_remote_code=model_args.trust_remote_code, padding_side=model_args.padding_side,
        extra_special_tokens=model_args.add_special_tokens, config=config,
    )
    template_name = data_args.conv_template
    if template_name == "auto" and preset.template:
        template_name = preset.template
    template, template_notice = get_template(template_name, tokenizer)
    check_template_tokens(template.markers, tokenizer, template=template.name)
    for notice in [*notices, template_notice, f"loss mode: {loss_mode}"]:
        say(notice)

    encoder = Encoder(template, tokenizer, loss_mode, args.model_max_length)
    # Every rank reads and checks the records, but only the writer rank writes the rejected ones.
    writes = args.should_save
    policy = ReadPolicy(data_args.max_invalid_ratio, data_args.strict,
                        str(output_dir / "rejected.jsonl") if writes else None)
    split = build_datasets(
        encoder, data_args.data_path, eval_data_path=data_args.eval_data_path, train_ratio=data_args.train_ratio,
        seed=args.data_seed if args.data_seed is not None else args.seed, lazy=data_args.lazy_preprocess,
        num_workers=data_args.preprocessing_num_workers, cache_dir=args.cache_dir,
        policy=policy, eval_policy=ReadPolicy(data_args.max_invalid_ratio, data_args.strict,
                                              str(output_dir / "rejected-eval.jsonl") if writes else None),
        main_process_first=args.main_process_first, progress=args.should_log and not args.disable_tqdm,
    )
    for notice in [*split.notices, *other_ranks_notices(split.notices)]:
        say(notice)
    audit = {}
    for name, part in (("train", split.train_audit), ("eval", split.eval_audit)):
        if part is not None:
            say(f"{name} audit:\n{part.format()}")
            audit[name] = part.to_dict()
    if args.should_save and audit:
        (output_dir / "audit.json").write_text(json.dumps(audit, indent=2, ensure_ascii=False) + "\n")
    if split.eval is None and args.eval_strategy != "no":
        raise ChatsftError(f"--eval_strategy {args.eval_strategy} needs an eval set: give --eval_data_path or "
                           "--train_ratio below 1")

    load = dict(dtype=_dtype(args, model_args), attn_implementation=model_args.attn_implementation,
                trust_remote_code=model_args.trust_remote_code, model_max_length=args.model_max_length,
                gradient_checkpointing=args.activation_checkpointing)
    model, grew, notices = load_model_for(tokenizer, model_args.model_name_or_path, **load)
    for notice in notices:
        say(notice)
    if model_args.lora_r > 0:
        model, notice = apply_lora(model, r=model_args.lora_r, alpha=model_args.lora_alpha,
                                   dropout=model_args.lora_dropout, target_modules=model_args.lora_target_modules,
                                   train_embeddings=grew, bias=model_args.lora_bias)
        say(notice)

    for notice in fill_fsdp_config(args, model):
        say(notice)

    train_dataset = split.train
    if data_args.packing:
        train_dataset = PackedDataset(split.train, args.model_max_length, lengths=split.train["length"])
        say(f"packing: {len(split.train)} examples into {len(train_dataset)} rows of up to "
            f"{args.model_max_length} tokens ({100 * train_dataset.fill():.1f}% full)")
    if data_args.padding_free or data_args.packing:
        base = PackedCollator(return_flash_attn_kwargs=(model_args.attn_implementation or "").startswith("flash"))
        _self_test_packing(model, split.train, say)
    else:
        base = PadCollator(tokenizer.pad_token_id, pad_to_multiple_of=data_args.pad_to_multiple_of)
    throughput = ThroughputCallback()
    preemption = PreemptionCallback()  # before CheckpointMarker: both act on the same on_step_end
    trainer = ChatTrainer(
        model=model, args=args, train_dataset=train_dataset, eval_dataset=split.eval,
        data_collator=CountingCollator(base), processing_class=tokenizer,
        callbacks=[preemption, CheckpointMarker()], meter=throughput.meter,
    )
    trainer.callback_handler.callbacks.insert(0, throughput)
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    finally:
        preemption.restore()
    if preemption.stopped_at is not None:
        say(f"stopped by {signal.Signals(preemption.signum).name} after step {preemption.stopped_at}: "
            f"{output_dir / f'checkpoint-{preemption.stopped_at}'} is saved; run the same command to resume "
            f"(exit code {preemption.exit_code})")
        return preemption.exit_code
    say(f"training done: {result.global_step} steps, final train loss {result.training_loss:.4f}")
    if split.eval is not None:
        metrics = trainer.evaluate()
        say(f"eval loss {metrics.get('eval_loss', float('nan')):.4f}")
    _save(trainer, tokenizer, template, encoder, split, audit, model_args, output_dir, say)
    return 0


def _save(trainer, tokenizer, template, encoder, split, audit, model_args, output_dir: Path, say) -> None:
    from chatsft.data import encoder_stop_ids
    from chatsft.final import save_final
    from chatsft.model import restore_use_cache
    from chatsft.plot import plot_loss
    from chatsft.templates import render_text

    restore_use_cache(trainer.model)
    check = None
    if split.sample is not None:
        messages = _through_last_reply(split.sample.messages)
        check = (messages, render_text(template, messages, bos=tokenizer.bos_token, eos=tokenizer.eos_token))
    extra = {"audit.json": json.dumps(audit, indent=2, ensure_ascii=False) + "\n"}
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_loss(trainer.state.log_history, Path(tmp) / "loss.png")
        extra["loss.png"] = png.read_bytes()
    final = save_final(trainer, tokenizer, output_dir, chat_template=template.jinja(),
                       stop_token_ids=list(encoder_stop_ids(encoder)), extra_files=extra, check_text=check,
                       merge=model_args.merge_lora)
    say(f"saved the final model to {final} (loads with AutoModelForCausalLM/AutoTokenizer; loss curve: loss.png)")


def _through_last_reply(messages: list[dict]) -> list[dict]:
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[: last + 1]


def _self_test_packing(model, dataset, say) -> None:
    """Packed examples must not see each other: compare a few packed against single forwards before training."""
    from chatsft.loss import check_packing

    sample = [dataset[i] for i in range(min(4, len(dataset)))]
    dtype = next(model.parameters()).dtype
    tol = 1e-4 if dtype.itemsize >= 4 else 1e-2
    diff = check_packing(model, sample, tol=tol)
    say(f"packing self-test: max per-token loss difference {diff:.2e} (tolerance {tol:g})")


def _dtype(args, model_args) -> str | None:
    """Full fine-tuning keeps fp32 master weights (the Trainer autocasts to bf16/fp16); LoRA loads the frozen base
    in the half type, since only the adapters are optimised."""
    if model_args.lora_r > 0:
        return "bf16" if args.bf16 else "fp16" if args.fp16 else None
    return None


def _sayer(args):
    logging.basicConfig(format="%(message)s", level=logging.INFO if args.should_log else logging.WARNING)

    def say(message: str) -> None:
        if args.should_log:
            print(f"[chatsft] {message}", flush=True)

    return say


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
