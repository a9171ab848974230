"""collate.py: exact padded and packed batches, best-fit-decreasing packing, and per-example isolation of
packed rows inside a tiny Llama (sdpa and eager, use_cache=False)."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import tiny_gqa_llama

from chatsft.collate import PackedCollator, PackedDataset, PadCollator, pack_examples

X = -100
EXAMPLES = [
    {"input_ids": [1, 5, 6, 7, 2], "labels": [X, X, X, 7, 2]},
    {"input_ids": [1, 8, 2], "labels": [X, 8, 2]},
    {"input_ids": [1, 9, 10, 11, 12, 13, 2], "labels": [X, X, X, 11, 12, 13, 2]},
]


def test_pad_collator_pads_to_longest_on_the_right():
    batch = PadCollator(pad_token_id=0)(EXAMPLES)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].tolist() == [
        [1, 5, 6, 7, 2, 0, 0],
        [1, 8, 2, 0, 0, 0, 0],
        [1, 9, 10, 11, 12, 13, 2],
    ]
    assert batch["labels"].tolist() == [
        [X, X, X, 7, 2, X, X],
        [X, 8, 2, X, X, X, X],
        [X, X, X, 11, 12, 13, 2],
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1],
    ]
    assert all(t.dtype == torch.long for t in batch.values())


def test_pad_collator_pad_to_multiple_of_8_and_never_to_a_fixed_length():
    batch = PadCollator(pad_token_id=3, pad_to_multiple_of=8)(EXAMPLES)
    assert batch["input_ids"].shape == (3, 8)
    assert batch["input_ids"][1].tolist() == [1, 8, 2, 3, 3, 3, 3, 3]
    assert batch["labels"][2].tolist() == [X, X, X, 11, 12, 13, 2, X]
    assert batch["attention_mask"].sum(1).tolist() == [5, 3, 7]
    # a batch of short examples stays short
    assert PadCollator(0, pad_to_multiple_of=8)(EXAMPLES[1:2])["input_ids"].shape == (1, 8)
    assert PadCollator(0)(EXAMPLES[1:2])["input_ids"].shape == (1, 3)


def test_collators_reject_mismatched_lengths():
    bad = [{"input_ids": [1, 2, 3], "labels": [X, 2]}]
    with pytest.raises(ValueError, match="differ in length"):
        PadCollator(0)(bad)
    with pytest.raises(ValueError, match="differ in length"):
        PackedCollator()(bad)


def test_packed_collator_exact_row():
    batch = PackedCollator()(EXAMPLES)
    # no attention_mask: with one, transformers would not look for packed sequences
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 2, 1, 8, 2, 1, 9, 10, 11, 12, 13, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6]]
    assert batch["labels"].tolist() == [[X, X, X, 7, 2, X, 8, 2, X, X, X, 11, 12, 13, 2]]


def test_packed_collator_flash_kwargs_and_seq_idx():
    batch = PackedCollator(return_flash_attn_kwargs=True, return_seq_idx=True)(EXAMPLES)
    assert batch["cu_seq_lens_q"].tolist() == [0, 5, 8, 15]
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["cu_seq_lens_k"] is batch["cu_seq_lens_q"]
    assert batch["max_length_q"] == batch["max_length_k"] == 7 and isinstance(batch["max_length_q"], int)
    assert batch["seq_idx"].tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2]]


def test_packed_collator_masks_a_trained_first_label():
    # "all tokens" loss mode trains label[0]; inside a row it would be the target of the previous example's
    # last token. Alone, label[0] is never a target (nothing precedes it), so masking it loses nothing.
    examples = [{"input_ids": [4, 5, 6], "labels": [4, 5, 6]}, {"input_ids": [7, 8], "labels": [7, 8]}]
    batch = PackedCollator()(examples)
    assert batch["labels"].tolist() == [[X, 5, 6, X, 8]]
    shifted = batch["labels"][0, 1:].tolist()  # target of position i is labels[i + 1]
    assert shifted[2] == X  # position 2 (the last token of example 0) has no target
    # trained targets packed == trained targets of the examples alone (2 + 1)
    assert sum(t != X for t in shifted) == sum(sum(t != X for t in e["labels"][1:]) for e in examples)


def test_pack_examples_best_fit_decreasing_exact():
    lengths = [5, 3, 8, 2, 7, 4, 1, 6]
    rows = pack_examples(lengths, capacity=10)
    # decreasing: 8(2) 7(4) 6(7) 5(0) 4(5) 3(1) 2(3) 1(6); each goes to the fullest row it fits
    assert rows == [[2, 3], [4, 1], [7, 5], [0, 6]]
    assert [sum(lengths[i] for i in r) for r in rows] == [10, 10, 10, 6]


def test_pack_examples_ties_are_deterministic():
    assert pack_examples([3, 3, 3, 3], capacity=6) == [[0, 1], [2, 3]]
    assert pack_examples([4, 4, 2], capacity=6) == [[0, 2], [1]]
    assert pack_examples([], capacity=6) == []


def test_pack_examples_covers_each_example_once_and_respects_capacity():
    rng = random.Random(0)
    for _ in range(20):
        capacity = rng.randint(16, 300)
        lengths = [rng.randint(1, capacity) for _ in range(rng.randint(1, 400))]
        rows = pack_examples(lengths, capacity)
        assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in r) <= capacity for r in rows)
        # best fit never leaves two rows that could have been one
        loads = sorted(sum(lengths[i] for i in r) for r in rows)
        assert len(loads) < 2 or loads[0] + loads[1] > capacity
        assert rows == pack_examples(lengths, capacity)


def test_pack_examples_rejects_examples_that_do_not_fit():
    with pytest.raises(ValueError, match="example 1 has length 11"):
        pack_examples([3, 11], capacity=10)
    with pytest.raises(ValueError, match="length 0"):
        pack_examples([0], capacity=10)


def test_packed_dataset_rows_collate_like_their_examples():
    examples = EXAMPLES + [{"input_ids": [1, 14, 2], "labels": [X, 14, 2]}]
    ds = PackedDataset(examples, capacity=10)
    assert ds.rows == [[2, 1], [0, 3]]
    assert len(ds) == 2 and ds.lengths == [10, 8] and ds.fill() == pytest.approx(18 / 20)
    collate = PackedCollator()
    for r, row in enumerate(ds.rows):
        assert ds[r]["position_ids"] == [p for i in row for p in range(len(examples[i]["input_ids"]))]
        from_row = collate([ds[r]])
        from_examples = collate([examples[i] for i in row])
        assert all(torch.equal(from_row[k], from_examples[k]) for k in from_examples)
    # two pre-packed rows in one batch become one longer row with all boundaries kept
    both = collate([ds[0], ds[1]])
    assert both["position_ids"].eq(0).sum().item() == 4
    assert both["input_ids"].shape == (1, 18)


def batch_inputs(batch):
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}


def _random_examples(vocab: int = 97):
    g = torch.Generator().manual_seed(1)
    out = []
    for n in (6, 1, 9, 4):
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [X] * (n // 2) + ids[n // 2 :]})
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_examples_are_isolated(attn):
    model = tiny_gqa_llama(97, attn).eval()
    examples = _random_examples()
    batch = PackedCollator()(examples)
    with torch.no_grad():
        packed = model(**batch_inputs(batch), use_cache=False).logits[0]
        start = 0
        for ex in examples:
            alone = model(input_ids=torch.tensor([ex["input_ids"]]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[start : start + len(ex["input_ids"])], alone, atol=1e-5, rtol=0)
            start += len(ex["input_ids"])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_examples_leak_when_a_cache_is_used(attn):
    """Why every packed forward passes use_cache=False: with the config's default use_cache=True transformers
    creates a cache, skips the packed-sequence mask, and the second example attends to the first."""
    model = tiny_gqa_llama(97, attn).eval()
    assert model.config.use_cache
    examples = _random_examples()
    batch = PackedCollator()(examples)
    n0 = len(examples[0]["input_ids"])
    with torch.no_grad():
        leaky = model(**batch_inputs(batch)).logits[0]
        alone = model(input_ids=torch.tensor([examples[2]["input_ids"]]), use_cache=False).logits[0]
    second = leaky[n0 + 1 : n0 + 1 + len(examples[2]["input_ids"])]
    assert (second - alone).abs().max().item() > 1e-2


def test_packed_loss_terms_equal_the_examples_alone(bpe_tokenizer):
    """Per-token losses of a packed row (real tokenizer, chatsft.training.tiny model) are those of the
    examples alone, target for target, including examples whose first label is trained."""
    from chatsft.training.loss import per_token_losses
    from chatsft.training.tiny import build_model

    model = build_model(bpe_tokenizer, hidden_size=32, layers=2, heads=4).eval()
    texts = ["USER: What is the capital of France?", "ASSISTANT: Paris.", "Hello! How are you today?"]
    examples = []
    for k, text in enumerate(texts):
        ids = [bpe_tokenizer.bos_token_id] + bpe_tokenizer(text, add_special_tokens=False)["input_ids"]
        labels = list(ids) if k == 1 else [X] * 3 + ids[3:]
        examples.append({"input_ids": ids, "labels": labels})
    with torch.no_grad():
        packed = per_token_losses(model, PackedCollator()(examples))
        alone = torch.cat(
            [
                per_token_losses(model, {k: torch.tensor([e[k]]) for k in ("input_ids", "labels")})
                for e in examples
            ]
        )
    assert packed.shape == alone.shape
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)
