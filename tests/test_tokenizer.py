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
