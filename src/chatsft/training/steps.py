"""The steps of `chatsft train`, each from the three argument dataclasses to what the next step needs.

`chatsft.commands.train.main` reads as the story (check -> tokenizer and encoder -> run manifest -> data ->
model -> Trainer -> train -> save); here each step turns the arguments into the calls of the library and the
training floor, and returns its notices for the story to announce.
"""

from __future__ import annotations

from pathlib import Path

from chatsft.data import build, plan_data
from chatsft.tokenizer import load_encoder, prepare_tokenizer
from chatsft.training.distributed import check_fsdp_supported, check_launch, fill_fsdp_config
from chatsft.training.lock import acquire_run_lock
from chatsft.training.lora import apply_lora
from chatsft.training.model import load_config, load_model_for
from chatsft.training.preflight import run_preflight


def check_run(model_args, data_args, args) -> list[str]:
    """Launch, FSDP and pre-flight checks (data files, output folder, disk), then the output folder's lock."""
    check_launch(args)
    check_fsdp_supported(args)
    notices = run_preflight(
        output_dir=args.output_dir,
        data_paths=[source.path for source in data_args.sources],
        eval_data_paths=data_args.eval_data_path or (),
        model_path=model_args.model_name_or_path,
        dtype=model_args.load_dtype(args),
        save_only_model=args.save_only_model,
        lora=model_args.lora_r > 0,
    )
    return [*notices, *acquire_run_lock(args.output_dir, writer=args.should_save)]


def tokenizer_and_encoder(model_args, data_args, args):
    """The model's config (for the default length), the prepared tokenizer and its encoder -> (tokenizer,
    encoder, notices). No weights are read."""
    config = load_config(model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code)
    notices = args.fill_model_max_length(config)
    tokenizer, preset, more = prepare_tokenizer(
        model_args.model_name_or_path,
        model_max_length=args.model_max_length,
        config=config,
        tokenizer_path=model_args.tokenizer_name_or_path,
        model_family=model_args.model_family,
        trust_remote_code=model_args.trust_remote_code,
        padding_side=model_args.padding_side,
        extra_special_tokens=model_args.add_special_tokens,
    )
    encoder, last = load_encoder(
        model_args.model_name_or_path,
        conv_template=data_args.conv_template,
        loss_mode=data_args.loss_mode,
        model_max_length=args.model_max_length,
        tokenizer=tokenizer,
        preset=preset,
    )
    return tokenizer, encoder, [*notices, *more, *last]


def data_plan(encoder, data_args, args):
    """What the run reads and how (sources, split, cache folder): the run manifest and `datasets` share it."""
    return plan_data(
        encoder,
        sources=data_args.sources,
        eval_data_path=data_args.eval_data_path,
        train_ratio=data_args.train_ratio,
        seed=args.data_seed if args.data_seed is not None else args.seed,
        cache_dir=args.cache_dir,
    )


def datasets(plan, data_args, args):
    """The run's `Split`: read, validated, encoded (or lazy), audited; rejected records kept by the writer."""
    return build(
        plan,
        lazy=data_args.lazy_preprocess,
        num_workers=data_args.preprocessing_num_workers,
        policy=data_args.read_policy(Path(args.output_dir) if args.should_save else None),  # one writer
        progress=args.should_log and not args.disable_tqdm,
    )


def model_for(tokenizer, model_args, args):
    """The weights fitted to the tokenizer, with LoRA adapters if asked, FSDP's layer class filled in ->
    (model, notices)."""
    model, grew, notices = load_model_for(
        tokenizer,
        model_args.model_name_or_path,
        dtype=model_args.load_dtype(args),
        attn_implementation=model_args.attn_implementation,
        trust_remote_code=model_args.trust_remote_code,
        model_max_length=args.model_max_length,
        gradient_checkpointing=args.activation_checkpointing,
    )
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
        notices.append(notice)
    return model, [*notices, *fill_fsdp_config(args, model)]
