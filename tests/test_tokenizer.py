"""chatsft.tokenizer and the embeddings that follow it: pad token, special tokens, family presets."""

from __future__ import annotations

import torch
from conftest import TINY_CTX as CTX

from chatsft.families import YUAN2_TOKENS
from chatsft.tokenizer import (
    add_special_tokens,
    load_tokenizer,
    prepare_tokenizer,
    setup_pad_token,
)
from chatsft.training.model import load_model_for, resize_embeddings
from chatsft.training.tiny import build_model


def test_pad_token_kept(tiny_dir):
    tokenizer = load_tokenizer(tiny_dir, model_max_length=128)
    assert setup_pad_token(tokenizer) == "kept"
    assert tokenizer.pad_token == "<pad>"
    assert (tokenizer.model_max_length, tokenizer.padding_side) == (128, "right")


def test_pad_token_unk(mistral_dir):
    tokenizer = load_tokenizer(mistral_dir, model_max_length=128, padding_side="left")
    assert tokenizer.pad_token is None
    assert setup_pad_token(tokenizer) == "unk"
    assert (tokenizer.pad_token, tokenizer.pad_token_id, len(tokenizer)) == ("<unk>", 0, 32000)
    assert tokenizer.padding_side == "left"


def test_pad_token_added_and_embeddings_resized(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(
        ["hello there, general kenobi"] * 5,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>")
    vocab = len(tokenizer)
    assert tokenizer.pad_token is None and tokenizer.unk_token is None
    model = build_model(tokenizer, hidden_size=32, layers=1, heads=4, max_positions=CTX)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()

    assert setup_pad_token(tokenizer) == "added"
    assert resize_embeddings(model, tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    assert (tokenizer.pad_token, tokenizer.pad_token_id, len(tokenizer)) == ("<pad>", vocab, vocab + 1)
    assert model.get_input_embeddings().weight.shape == (vocab + 1, 32)
    assert model.get_output_embeddings().weight.shape == (vocab + 1, 32)
    assert model.config.vocab_size == vocab + 1 and model.config.pad_token_id == vocab
    assert torch.equal(model.get_input_embeddings().weight[:vocab], old_in)
    assert torch.equal(model.get_input_embeddings().weight[vocab], old_in.mean(dim=0))
    assert torch.equal(model.get_output_embeddings().weight[vocab], old_out.mean(dim=0))


def test_yuan2_preset_adds_tokens_and_resizes(tiny_dir, bpe_tokenizer):
    vocab = len(bpe_tokenizer)
    tokenizer, preset, notices = prepare_tokenizer(tiny_dir, model_max_length=CTX, model_family="yuan2")
    model, grew, more = load_model_for(tokenizer, tiny_dir)
    assert preset.template == "yuan2" and preset.special_tokens == YUAN2_TOKENS
    # The tiny vocabulary already holds <eod>, <sep>, <pad>: the 13 others take the next ids, in list order
    new = [t for t in YUAN2_TOKENS if t not in ("<eod>", "<sep>", "<pad>")]
    assert len(new) == 13 and len(tokenizer) == vocab + 13
    assert tokenizer.convert_tokens_to_ids(new) == list(range(vocab, vocab + 13))
    assert tokenizer.convert_tokens_to_ids("<eod>") == bpe_tokenizer.convert_tokens_to_ids("<eod>")
    assert tokenizer.tokenize("a<FIM_MIDDLE>b") == ["a", "<FIM_MIDDLE>", "b"]
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == model.config.vocab_size
    assert model.get_output_embeddings().weight.shape[0] == len(tokenizer)
    assert grew and f"pad token {tokenizer.pad_token!r} (kept)" in notices
    assert "family yuan2: template yuan2, 13 special tokens added" in notices
    assert f"embeddings resized {vocab} -> {vocab + 13} (new rows = mean of the old ones)" in more
    assert add_special_tokens(tokenizer, YUAN2_TOKENS) == 0 and not resize_embeddings(model, tokenizer)


def test_the_copy_of_autotokenizers_exceptions_matches_transformers():
    from transformers.models.auto import tokenization_auto as auto

    from chatsft import tokenizer as module

    generic = {"TokenizersBackend", "PythonBackend", "PreTrainedTokenizerFast", None}
    assert list(module._BACKEND_IDS) == auto.MODEL_IDS_TO_TOKENIZERS_BACKEND
    incorrect = auto.MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS
    registered = {m: auto.TOKENIZER_MAPPING_NAMES.get(m) for m in incorrect}
    assert module._REGISTERED_WINS == {m: c for m, c in registered.items() if c not in generic}
    mistral = {m for m, c in auto.TOKENIZER_MAPPING_NAMES.items() if c == "MistralCommonBackend"}
    assert mistral <= module._MISTRAL_COMMON_TYPES  # all of them while mistral-common is installed


def test_tokenizer_class_is_the_one_autotokenizer_loads(tiny_dir, mistral_dir, bpe_tokenizer, tmp_path):
    """Without AutoTokenizer (and torch) where its answer is sure: the same class and the same ids; where
    one of its exceptions may apply, None, and AutoTokenizer decides."""
    import json

    from transformers import AutoTokenizer

    from chatsft.tokenizer import _tokenizer_class

    def folder(name, model_type, tokenizer_class):
        dest = tmp_path / name
        bpe_tokenizer.save_pretrained(dest)
        settings = json.loads((dest / "tokenizer_config.json").read_text())
        settings["tokenizer_class"] = tokenizer_class
        (dest / "tokenizer_config.json").write_text(json.dumps(settings))
        (dest / "config.json").write_text(json.dumps({"model_type": model_type}))
        return dest

    qwen_named = folder("qwen_named", "qwen2", "Qwen2TokenizerFast")
    qwen_generic = folder("qwen_generic", "qwen2", "TokenizersBackend")  # qwen2: the registered class wins
    mistral_generic = folder("mistral_generic", "mistral", "PreTrainedTokenizerFast")
    llama_json = folder("llama_json", "llama", "LlamaTokenizer")  # AutoTokenizer reads tokenizer.json first
    # folder: (the class found without AutoTokenizer, the class AutoTokenizer loads)
    expected = {
        tiny_dir: ("TokenizersBackend", "TokenizersBackend"),
        mistral_dir: ("LlamaTokenizer", "LlamaTokenizer"),
        qwen_named: ("Qwen2Tokenizer", "Qwen2Tokenizer"),
        qwen_generic: (None, "Qwen2Tokenizer"),
        mistral_generic: (None, "TokenizersBackend"),
        llama_json: (None, "TokenizersBackend"),
    }
    text = "USER: Hello! 你好 ASSISTANT: fine</s>"
    for path, (name, auto_name) in expected.items():
        cls = _tokenizer_class(str(path))
        auto = AutoTokenizer.from_pretrained(path)
        ours = load_tokenizer(path, model_max_length=128)
        assert ((cls and cls.__name__), type(auto).__name__) == (name, auto_name), path
        assert type(ours) is type(auto)
        assert ours(text).input_ids == auto(text).input_ids
        assert ours.all_special_tokens == auto.all_special_tokens
