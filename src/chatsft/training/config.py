"""The three argument dataclasses of `chatsft train` and how a command line (plus `--config FILE.yaml`)
becomes them.

Training arguments extend `transformers.TrainingArguments`, so every HF flag works. FastChat's names are kept
(`--data_path`, `--lazy_preprocess`, `--model_max_length`, ...); flags that transformers 5 renamed or removed
are translated first by `chatsft.training.compat`. (Over 300 lines: most of it is the fields' help text and
their checks in `__post_init__`, which belong beside the fields.)
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import transformers

from chatsft.encode import loss_mode_from_flags
from chatsft.errors import ConfigError
from chatsft.records import ReadPolicy
from chatsft.training.compat import translate_flags


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Local model folder (config, weights, tokenizer)."})
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer folder, if not the model's."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run the model folder's own Python code."}
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "eager, sdpa, flash_attention_2, flex_attention (default: transformers' choice)."},
    )
    model_family: str | None = field(
        default=None,
        metadata={
            "help": "Preset (yuan2, baichuan, baichuan2): template and special tokens. "
            "Default: detected from config.model_type."
        },
    )
    add_special_tokens: list[str] = field(
        default_factory=list, metadata={"help": "Extra special tokens to register (embeddings are resized)."}
    )
    padding_side: str = field(default="right", metadata={"help": "Tokenizer padding side (FastChat flag)."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains all weights."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Module names for LoRA (default: every linear layer of attention and MLP)."},
    )
    lora_bias: str = field(
        default="none",
        metadata={
            "help": "Bias terms trained with LoRA (peft): none, all, lora_only (FastChat flag).",
            "choices": ["none", "all", "lora_only"],
        },
    )
    merge_lora: bool = field(
        default=False, metadata={"help": "Also save the LoRA weights merged into the model."}
    )

    def load_dtype(self, args) -> str | None:
        """Full fine-tuning keeps fp32 master weights (the Trainer autocasts to bf16/fp16); LoRA loads the
        frozen base in the half type, since only the adapters are optimised."""
        if self.lora_r > 0:
            return "bf16" if args.bf16 else "fp16" if args.fp16 else None
        return None


@dataclass
class DataArguments:
    data_path: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Training data, one source each: .json (a list or JSON Lines), .jsonl or .parquet files "
            "(ShareGPT `conversations` or OpenAI `messages`), folders of such shards, folders written by "
            "datasets' save_to_disk, or Hub dataset names (org/name[:split], through datasets.load_dataset, "
            "where the network allows)."
        },
    )
    datasets: list[str] | None = field(
        default=None,
        metadata={
            "help": "A mixture, instead of or beside --data_path: one entry per source, "
            "PATH::weight=W,max_samples=N,conv_template=T,loss_mode=M,system=S,fields.OURS=THEIRS,"
            "roles.THEIRS=OURS (each option optional), or a JSON object with those keys; a `datasets:` list "
            "of mappings in --config. weight: average uses of each conversation (0.5 a random half, 2 "
            "twice), seeded; max_samples: the first N accepted conversations."
        },
    )
    eval_data_path: list[str] | None = field(
        default=None, metadata={"help": "Evaluation data: files, folders or Hub names, as --data_path."}
    )
    train_ratio: float = field(
        default=1.0,
        metadata={"help": "Share of data_path kept for training; the rest (seeded split) is the eval set."},
    )
    lazy_preprocess: bool = field(
        default=False, metadata={"help": "Encode examples on access instead of up front."}
    )
    conv_template: str = field(
        default="auto", metadata={"help": "Template name, `tokenizer` (its Jinja chat_template) or `auto`."}
    )
    loss_mode: str | None = field(
        default=None,
        metadata={"help": "assistant_turns (default), last_response, split_turns, all_tokens."},
    )
    efficient_loss: bool = field(
        default=False, metadata={"help": "FastChat/Yuan2 flag: loss_mode assistant_turns."}
    )
    last_response_loss: bool = field(
        default=False, metadata={"help": "FastChat/Yuan2 flag: loss_mode last_response."}
    )
    split_example_loss: bool = field(
        default=False, metadata={"help": "FastChat/Yuan2 flag: loss_mode split_turns."}
    )
    max_invalid_ratio: float = field(
        default=0.1, metadata={"help": "Stop before training if more than this share of records is rejected."}
    )
    strict: bool = field(default=False, metadata={"help": "Stop at the first rejected record."})
    preprocessing_num_workers: int | None = field(
        default=None,
        metadata={"help": "Processes for eager encoding (default: the CPUs this process may use)."},
    )
    padding_free: bool = field(
        default=True,
        metadata={
            "help": "Concatenate each batch's examples into one row with restarting position_ids (no padding "
            "at all); False pads each batch to its longest example."
        },
    )
    packing: bool = field(
        default=False,
        metadata={"help": "Pre-pack examples into rows of up to model_max_length (best-fit decreasing)."},
    )
    pad_to_multiple_of: int | None = field(
        default=None, metadata={"help": "With padding: pad lengths to a multiple."}
    )

    def __post_init__(self):
        from chatsft.mixture import DataSource, parse_source

        if not self.data_path and not self.datasets:
            raise ConfigError("--data_path (or --datasets) is required")
        # every source of the run: each --data_path entry with no options, then each --datasets entry
        self.sources = [DataSource(p) for p in self.data_path] + [
            parse_source(d) for d in self.datasets or []
        ]
        # one loss mode from the named flag or FastChat's booleans (two at once is an error)
        self.loss_mode = loss_mode_from_flags(
            self.loss_mode, self.efficient_loss, self.last_response_loss, self.split_example_loss
        )
        if not 0.0 <= self.max_invalid_ratio <= 1.0:  # also catches nan
            raise ConfigError(f"--max_invalid_ratio must be between 0 and 1, got {self.max_invalid_ratio}")
        if self.packing and self.lazy_preprocess:
            raise ConfigError("--packing needs every example's length up front: drop --lazy_preprocess")

    def read_policy(self, rejects_dir: Path | None) -> ReadPolicy:
        """Skip, count and (with `rejects_dir`, on the writing rank) keep rejected records."""
        return ReadPolicy(
            self.max_invalid_ratio,
            self.strict,
            str(rejects_dir / "rejected.jsonl") if rejects_dir is not None else None,
        )


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    model_max_length: int | None = field(
        default=None,
        metadata={
            "help": "Maximum tokens per example; longer examples are truncated (start kept). Default: the "
            "model's context (max_position_embeddings). Above it, RoPE scaling is applied."
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where encoded datasets are cached."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start fresh even if output_dir holds checkpoints."}
    )
    optim: str = field(
        default="adamw_torch_fused",
        metadata={
            "help": "Optimizer. AdamW as FastChat's adamw_torch, in torch's fused kernel (transformers' own "
            "default): the same update, 5-9x faster per step on CPU (benchmarks/README.md)."
        },
    )
    loss_head: str = field(
        default="plain",
        metadata={
            "help": "Cross-entropy over the trained logits: plain (fp32 copy, F.cross_entropy) or chunked "
            "(fp32 in blocks of rows, same result, far less memory at large vocabularies; training/loss.py).",
            "choices": ["plain", "chunked"],
        },
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the collator picks columns."}
    )
    resume_anyway: bool = field(
        default=False,
        metadata={
            "help": "Resume from a checkpoint although its run manifest (data, template, model, tokenizer, "
            "hyper-parameters) differs from this command's; the change is named in a notice."
        },
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={
            "help": "DDP's find_unused_parameters. False (chatsft's default): every parameter of a chat "
            "model gets a gradient each step; set True for a model that skips some (a mixture of experts)."
        },
    )
    eval_generations: int = field(
        default=0,
        metadata={
            "help": "At each evaluation, sample replies to this many eval prompts and log them (printed, "
            "generations.jsonl in output_dir, and the --report_to integrations)."
        },
    )
    eval_generation_max_new_tokens: int = field(
        default=64, metadata={"help": "Longest sampled reply with --eval_generations."}
    )

    def __post_init__(self):
        from chatsft.training.distributed import choose_cpu
        from chatsft.training.reporting import check_report_to

        # one line each, before the model loads (transformers would fail late, or train on nothing)
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if not math.isfinite(self.learning_rate) or self.learning_rate < 0:
            raise ConfigError(f"--learning_rate must be a finite number >= 0, got {self.learning_rate}")
        if self.model_max_length is not None and self.model_max_length < 2:
            raise ConfigError(
                f"--model_max_length must be at least 2 tokens (a reply and its end-of-turn marker), got "
                f"{self.model_max_length}"
            )
        # before the device is set up in super().__post_init__; said by the train command
        self.device_notices = [n for n in [choose_cpu(self)] if n]
        if not self.fsdp:
            self.fsdp_config = None  # `--fsdp ''` alone turns FSDP off, whatever a --config file set
        super().__post_init__()
        check_report_to(self.report_to)
        if self.eval_generations < 0:
            raise ConfigError(f"--eval_generations must be 0 or more, got {self.eval_generations}")

    def fill_model_max_length(self, config) -> list[str]:
        """FastChat defaults to 512; the model's own context is what users expect."""
        if self.model_max_length is not None:
            return []
        from chatsft.tokenizer import context_length

        self.model_max_length = context_length(config)
        return [f"--model_max_length not given: using the model's context, {self.model_max_length} tokens"]

    def check_eval_set(self, has_eval: bool) -> None:
        if not has_eval and self.eval_strategy != "no":
            raise ConfigError(
                f"--eval_strategy {_plain(self.eval_strategy)} needs an eval set: give --eval_data_path or "
                "--train_ratio below 1"
            )
        if not has_eval and self.eval_generations:
            raise ConfigError(
                "--eval_generations needs an eval set: give --eval_data_path or --train_ratio below 1"
            )


def _plain(value) -> str:
    """`steps`, not `IntervalStrategy.STEPS`: an enum as the user typed it."""
    return str(getattr(value, "value", value))


def _plain_message(err: Exception) -> str:
    """A transformers ValueError as one line, its enums as flag values (`IntervalStrategy.STEPS` ->
    `steps`)."""
    text = " ".join(line.strip(" -") for line in str(err).splitlines() if line.strip())
    return re.sub(r"\b[A-Z][A-Za-z]*(?:Strategy|Type)\.([A-Z_0-9]+)\b", lambda m: m.group(1).lower(), text)


def parse_args(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, TrainingArguments, list[str]]:
    """Parse `argv` (after `--config FILE.yaml` expansion and FastChat flag translation); return notices
    too."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = expand_config(argv)
    argv, notices = translate_flags(argv)
    parser = transformers.HfArgumentParser(
        (ModelArguments, DataArguments, TrainingArguments),
        prog="chatsft train",
        description="Fine-tune a causal LM on conversations. `--config FILE.yaml` reads flags from a YAML "
        "mapping (command-line flags override it); FastChat-era flags are translated with a notice.",
        allow_abbrev=False,  # `--max_step 1` is a typo, not --max_steps
    )
    from chatsft.training.distributed import check_gpu_settings

    namespace, _ = parser.parse_known_args(argv)
    check_gpu_settings(namespace)  # every GPU-only setting in one message, before any is refused alone
    try:
        model_args, data_args, training_args, rest = parser.parse_args_into_dataclasses(
            args=argv, return_remaining_strings=True
        )
    except ValueError as err:  # TrainingArguments.__post_init__ checks combinations
        raise ConfigError(_plain_message(err)) from None
    except ImportError as err:  # e.g. --deepspeed without the deepspeed package
        raise ConfigError(
            f"a flag needs a package that is not installed: {str(err).splitlines()[0]}"
        ) from None
    if rest:
        raise ConfigError(f"unknown arguments: {' '.join(rest)} (see `chatsft train --help`)")
    return model_args, data_args, training_args, notices


def expand_config(argv: list[str]) -> list[str]:
    """Replace `--config FILE.yaml` by the flags it holds, placed first so that command-line flags override
    it."""
    if "--config" not in argv:
        return argv
    i = argv.index("--config")
    if i + 1 >= len(argv):
        raise ConfigError("--config needs a YAML file")
    path = Path(argv[i + 1])
    rest = argv[:i] + argv[i + 2 :]
    import yaml

    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as err:
        raise ConfigError(f"--config {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {path}: not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values")
    return config_to_flags(values) + rest


def config_to_flags(values: dict) -> list[str]:
    import json

    flags: list[str] = []
    for key, value in values.items():
        flags.append(f"--{key}")
        if isinstance(value, list):  # a mapping in a list (a `datasets:` entry) travels as JSON
            flags.extend(json.dumps(v) if isinstance(v, dict) else str(v) for v in value)
        elif isinstance(value, dict):
            flags.append(json.dumps(value))
        elif value is None:
            flags.pop()
        else:
            flags.append(str(value))
    return flags
