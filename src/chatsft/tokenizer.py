"""Load a tokenizer as training sees it: the model's config, its family preset, special tokens, a pad token.

No weights are read (data problems surface before the model loads) and nothing here imports torch, so
`prepare`, `preview` and `check` stay light. `load_encoder` is the one path from a model folder to an
`Encoder` and its stop ids, shared by `train`, `prepare` and `preview`.

transformers' AutoConfig and AutoTokenizer import every model configuration and, through them, torch: seconds
before `preview` shows one record. For a local folder both are read without them where the answer is sure
to be the same: the config fields the presets and the context need straight from config.json
(`read_config_fields`), and the tokenizer class from tokenizer_config.json (`_tokenizer_class`, which
copies AutoTokenizer's exceptions; tests/test_tokenizer.py checks the copy against transformers). Anything
else goes through AutoConfig and AutoTokenizer as before.
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

from chatsft.encode import LOSS_MODES, Encoder, loss_mode_from_flags
from chatsft.errors import ConfigError
from chatsft.families import Preset, resolve_preset
from chatsft.templates import TEMPLATE_CHOICES, get_template


class PreparedTokenizer(NamedTuple):
    tokenizer: object
    preset: Preset
    notices: list[str]


FALLBACK_CONTEXT = 2048  # a config without max_position_embeddings, or a tokenizer-only folder


def check_model_path(path, what: str) -> str:
    path = os.path.expanduser(os.fspath(path))
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ConfigError(f"{what} path {path!r} is a file; give the model folder")
        return path
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ConfigError(f"{what} folder {path!r} does not exist")
    return path  # an "org/name" hub id: transformers resolves it from its cache (or the hub when online)


def hub_error(path: str, what: str, err: Exception) -> ConfigError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ConfigError(f"cannot load the {what} from {path!r}: {first}")


def load_config(path, *, trust_remote_code: bool = False):
    """The model's config, with a `ConfigError` for a missing folder or a folder without config.json."""
    from transformers import AutoConfig

    path = check_model_path(path, "model")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"model folder {path!r} has no config.json")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:  # unreadable JSON, unknown model_type, remote code refused
        raise hub_error(path, "model config", err) from None


def load_tokenizer(
    path, *, model_max_length: int, trust_remote_code: bool = False, padding_side: str = "right"
):
    """The (fast) tokenizer from a local folder or a cached hub id, with model_max_length and padding_side."""
    if padding_side not in ("right", "left"):
        raise ConfigError(f"padding_side must be 'right' or 'left', not {padding_side!r}")
    path = check_model_path(path, "tokenizer")
    cls = None if trust_remote_code else _tokenizer_class(path)
    try:
        if cls is not None:
            return cls.from_pretrained(path, model_max_length=model_max_length, padding_side=padding_side)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(
            path,
            model_max_length=model_max_length,
            padding_side=padding_side,
            trust_remote_code=trust_remote_code,
        )
    # no tokenizer files, protobuf missing, remote code refused
    except (OSError, ValueError, TypeError) as err:
        raise hub_error(path, "tokenizer", err) from None


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_config_fields(path):
    """`model_type`, `vocab_size` and `max_position_embeddings` of a local model folder's config.json, read
    as JSON; None where only AutoConfig can say (remote code, an unknown model type, a field missing or
    nested, so that a class default or an attribute map would decide)."""
    raw = _read_json(Path(path) / "config.json")
    if raw is None or "auto_map" in raw:
        return None
    from transformers.models.auto.auto_mappings import CONFIG_MAPPING_NAMES

    fields = ("vocab_size", "max_position_embeddings")
    if raw.get("model_type") not in CONFIG_MAPPING_NAMES or not all(type(raw.get(f)) is int for f in fields):
        return None
    return SimpleNamespace(model_type=raw["model_type"], **{f: raw[f] for f in fields})


# AutoTokenizer's exceptions to "the class tokenizer_config.json names" for a local folder without remote
# code (transformers 5.24, models/auto/tokenization_auto.py): hub ids it loads with TokenizersBackend
# (MODEL_IDS_TO_TOKENIZERS_BACKEND), model types whose registered class beats the named one
# (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS, those not registered as TokenizersBackend), and model types
# that may load with MistralCommonBackend when the named class is generic.
_BACKEND_IDS = (
    "deepseek-ai/deepseek-r1-distill-llama-*",
    "deepseek-ai/deepseek-coder-*",
    "allenai/dolma2-tokenizer",
    "google/umt5-small",
    "naver-clova-ix/donut-*",
    "salesforce/blip2-opt-*",
    "salesforce/blip2-flan-t5-*",
    "salesforce/instructblip-flan-t5-*",
    "stepfun-ai/step-3.7-*",
)
_REGISTERED_WINS = {
    "hyperclovax_vision_v2": "GPT2Tokenizer",
    "qwen2": "Qwen2Tokenizer",
    "qwen3_5": "Qwen3_5Tokenizer",
    "qwen3_5_moe": "Qwen3_5Tokenizer",
    "qwen3_5_moe_text": "Qwen3_5Tokenizer",
    "qwen4_exp": "Qwen3_5Tokenizer",
    "siglip2": "Siglip2Tokenizer",
}
_MISTRAL_COMMON_TYPES = frozenset(
    "ministral ministral3 mistral mistral3 mistral_large4 mixtral pixtral voxtral voxtral_realtime".split()
)
_GENERIC = ("TokenizersBackend", "PreTrainedTokenizerFast", "PythonBackend")


def _tokenizer_class(path: str):
    """The class AutoTokenizer would load the local folder `path` with, found without importing it; None
    where any of its other rules could apply (then AutoTokenizer decides)."""
    folder = Path(path)
    settings = _read_json(folder / "tokenizer_config.json") if folder.is_dir() else None
    name = settings.get("tokenizer_class") if settings else None
    if not isinstance(name, str) or "auto_map" in settings:
        return None
    if any(fnmatch.fnmatch(os.fspath(path).lower(), pattern) for pattern in _BACKEND_IDS):
        return None
    name = name if name == "PreTrainedTokenizerFast" else name.removesuffix("Fast")
    if name == "LlamaTokenizer" and (folder / "tokenizer.json").is_file():
        return None  # AutoTokenizer looks for a ByteLevel tokenizer.json, which LlamaTokenizer would mangle
    config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    if config is None or "auto_map" in config or "model_name" in config:  # model_name: as model_type below
        return None
    model_type = config.get("model_type")
    if model_type in _REGISTERED_WINS and _REGISTERED_WINS[model_type] != name:
        return None
    if model_type in _MISTRAL_COMMON_TYPES and name in _GENERIC:
        return None
    import transformers

    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedTokenizerBase)):
        return None
    return transformers.TokenizersBackend if cls.__name__ == "PythonBackend" else cls


def add_special_tokens(tokenizer, tokens: list[str]) -> int:
    """Add the tokens the tokenizer lacks as special tokens; return how many were new. The model's embeddings
    follow when it loads (`chatsft.training.model.load_model_for`; FastChat's Yuan2 script forgets this)."""
    return tokenizer.add_tokens(list(tokens), special_tokens=True) if tokens else 0


def setup_pad_token(tokenizer) -> str:
    """Give the tokenizer a pad token: its own ("kept"), else the unk token ("unk", FastChat's choice), else a
    new `<pad>` ("added"). The model's embeddings and `config.pad_token_id` follow when it loads."""
    if tokenizer.pad_token is not None:
        how = "kept"
    elif tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
        how = "unk"
    else:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
        how = "added"
    return how


def prepare_tokenizer(
    path,
    *,
    model_max_length: int,
    tokenizer_path=None,
    model_family: str | None = None,
    trust_remote_code: bool = False,
    padding_side: str = "right",
    extra_special_tokens: list[str] | None = None,
    config=None,
) -> PreparedTokenizer:
    """Config -> family preset -> tokenizer with the family's and the user's special tokens and a pad token.

    Reads only the config (pass it when the
    caller has read it already), never the weights, so data problems surface before the model is loaded.
    """
    config = config or load_config(path, trust_remote_code=trust_remote_code)
    preset = resolve_preset(config, model_family=model_family, name_or_path=os.fspath(path))
    tokenizer = load_tokenizer(
        tokenizer_path or path,
        model_max_length=model_max_length,
        trust_remote_code=trust_remote_code,
        padding_side=padding_side,
    )
    notices = []
    if preset.name != "none":
        added = add_special_tokens(tokenizer, preset.special_tokens)
        notices.append(
            f"family {preset.name}: template {preset.template}"
            + (f", {added} special tokens added" if preset.special_tokens else "")
        )
    if extra_special_tokens:
        added = add_special_tokens(tokenizer, extra_special_tokens)
        notices.append(f"--add_special_tokens: {added} of {len(extra_special_tokens)} tokens were new")
    pad = setup_pad_token(tokenizer)
    notices.append(f"pad token {tokenizer.pad_token!r} ({pad})")
    return PreparedTokenizer(tokenizer, preset, notices)


class LoadedEncoder(NamedTuple):
    encoder: Encoder
    notices: list[str]


def load_encoder(
    path,
    *,
    conv_template: str,
    loss_mode: str,
    model_max_length: int,
    tokenizer=None,
    model_family: str | None = None,
    extra_special_tokens: list[str] | None = None,
    preset: Preset | None = None,
    config=None,
) -> LoadedEncoder:
    """Tokenizer -> template -> encoder -> stop ids, as `chatsft train` resolves them.

    `path` is a model folder (config.json: family presets apply) or a folder with only tokenizer files. Pass
    `tokenizer` (and its `preset`) when the caller has prepared it already, `config` when it has read it.
    """
    path, notices = Path(path), []
    if tokenizer is None and (path / "config.json").is_file():
        tokenizer, preset, notices = prepare_tokenizer(
            path,
            model_max_length=model_max_length,
            model_family=model_family,
            extra_special_tokens=extra_special_tokens,
            config=config or read_config_fields(path),
        )
    elif tokenizer is None:  # a tokenizer-only folder
        tokenizer = load_tokenizer(path, model_max_length=model_max_length)
        if extra_special_tokens:
            added = add_special_tokens(tokenizer, extra_special_tokens)
            notices.append(f"--add_special_tokens: {added} of {len(extra_special_tokens)} tokens were new")
    if conv_template == "auto" and preset is not None and preset.template:
        conv_template = preset.template
    template, notice = get_template(conv_template, tokenizer)
    encoder = Encoder(template, tokenizer, loss_mode, model_max_length)
    return LoadedEncoder(encoder, [*notices, notice, f"loss mode: {loss_mode}"])


def add_encoder_arguments(parser) -> None:
    """The flags of `load_encoder_from_args`, as `prepare` and `preview` take them: the names and meaning of
    `chatsft train`'s."""
    parser.add_argument(
        "--data_path",
        nargs="+",
        required=True,
        metavar="FILE",
        help="conversation files (.json, .jsonl, .parquet; ShareGPT or OpenAI messages), folders of them, "
        "datasets save_to_disk folders, or Hub dataset names (org/name[:split], where the network allows)",
    )
    parser.add_argument(
        "--model_name_or_path", required=True, metavar="PATH", help="model or tokenizer folder (local)"
    )
    parser.add_argument(
        "--conv_template",
        default="auto",
        choices=TEMPLATE_CHOICES,
        help="prompt format; auto = the tokenizer's chat_template, else vicuna_v1.1",
    )
    parser.add_argument("--loss_mode", default=None, choices=LOSS_MODES, help="default: assistant_turns")
    for flag in ("efficient_loss", "last_response_loss", "split_example_loss"):
        parser.add_argument(f"--{flag}", action="store_true", help="FastChat/Yuan2 flag for --loss_mode")
    parser.add_argument(
        "--model_max_length",
        type=int,
        default=None,
        metavar="N",
        help="truncate examples to N tokens, keeping the start (default, as train: the model's context, "
        f"max_position_embeddings; {FALLBACK_CONTEXT} for a folder without config.json)",
    )
    parser.add_argument("--model_family", default=None, help="preset (yuan2, baichuan, baichuan2)")
    parser.add_argument(
        "--add_special_tokens",
        nargs="*",
        default=[],
        metavar="TOKEN",
        help="extra special tokens to register, as in train",
    )


def context_length(config) -> int:
    """The default `--model_max_length` of train, prepare and preview: the model's
    `max_position_embeddings`."""
    return getattr(config, "max_position_embeddings", None) or FALLBACK_CONTEXT


def load_encoder_from_args(args) -> LoadedEncoder:
    """`load_encoder` from the flags of `add_encoder_arguments`."""
    loss_mode = loss_mode_from_flags(
        args.loss_mode, args.efficient_loss, args.last_response_loss, args.split_example_loss
    )
    max_length, notices, config = args.model_max_length, [], None
    if max_length is None:  # what train would use, so that the examples shown are the ones it trains on
        path = args.model_name_or_path
        has_config = (Path(path) / "config.json").is_file()
        config = (read_config_fields(path) or load_config(path)) if has_config else None
        max_length = context_length(config) if has_config else FALLBACK_CONTEXT
        notices.append(
            f"--model_max_length not given: using the model's context, {max_length} tokens"
            if has_config
            else f"--model_max_length not given: {max_length} tokens (no config.json to read the context "
            "from)"
        )
    encoder, more = load_encoder(
        args.model_name_or_path,
        conv_template=args.conv_template,
        loss_mode=loss_mode,
        model_max_length=max_length,
        model_family=args.model_family,
        extra_special_tokens=args.add_special_tokens,
        config=config,  # read once: the context above, the family preset in load_encoder
    )
    return LoadedEncoder(encoder, [*notices, *more])
