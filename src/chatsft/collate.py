"""Examples -> batches: pad to the longest example, or pack examples into one row without any padding.

Two collators share one contract: they take examples (`{"input_ids": [...], "labels": [...]}`, labels -100
where not trained, not pre-shifted) and return torch tensors the model and
`chatsft.training.loss.causal_lm_loss` accept.

- `PadCollator` pads right to the longest example of the batch (never to `model_max_length`), labels -100
  and `attention_mask` 0 on padding.
- `PackedCollator` is padding-free (what transformers' `DataCollatorWithFlattening` does): the batch becomes
  one row, `position_ids` restart at 0 at every example, there is no `attention_mask`. transformers detects
  the example boundaries from the `position_ids`: sdpa/eager/flex build a block-diagonal causal mask
  (`masking_utils.find_packed_sequence_indices`, a new example wherever the position does not grow by 1) but
  only when `attention_mask is None` and `past_key_values is None`, so the forward must pass
  `use_cache=False` (a cache is created otherwise and the examples silently attend to each other);
  flash-attention runs varlen from `cu_seq_lens_q/k` + `max_length_q/k` when given
  (`return_flash_attn_kwargs=True`, which saves re-deriving them from `position_ids` in every layer and a
  device sync), else from `position_ids` when the batch size is 1. The label at the first token of each
  example is set to -100: after the model's shift it is the target of the previous example's last token, and
  alone it is never a target, so masking it changes nothing but the cross-example prediction.

`pack_examples` assigns examples to rows of at most `capacity` tokens (best-fit decreasing), and
`PackedDataset` pre-packs a dataset with it so that each item is one packed row: the HF Trainer then needs
no custom sampler (its random/distributed samplers shuffle and shard rows, `len()` gives the step count,
resuming skips rows) and `per_device_train_batch_size` counts rows (use 1; larger values concatenate rows
into one longer row).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence

import torch

IGNORE_INDEX = -100
# Batch key of the token counts added by chatsft.training.metrics.CountingCollator; never passed to the model.
STATS_KEY = "chatsft_stats"


class PadCollator:
    """Right-pad a batch to its longest example (rounded up to `pad_to_multiple_of`)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError("PadCollator needs a pad_token_id (set the tokenizer's pad token first)")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        ids = [_as_list(f["input_ids"]) for f in features]
        labels = [_as_list(f["labels"]) for f in features]
        width = max(len(x) for x in ids)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        label_t = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, (x, y) in enumerate(zip(ids, labels)):
            _check_same_length(x, y)
            input_ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
            label_t[row, : len(y)] = torch.tensor(y, dtype=torch.long)
            attention_mask[row, : len(x)] = 1
        return {"input_ids": input_ids, "labels": label_t, "attention_mask": attention_mask}


class PackedCollator:
    """Concatenate a batch into one row of shape (1, total_tokens) with `position_ids` restarting per example.

    A feature is either an example or a row already packed by `PackedDataset` (it then carries
    `position_ids`; its examples start where they are 0). Never returns an `attention_mask`: transformers
    only looks for packed sequences in `position_ids` when there is none. Every forward on this batch must
    pass `use_cache=False`.
    """

    def __init__(self, return_flash_attn_kwargs: bool = False, return_seq_idx: bool = False):
        self.return_flash_attn_kwargs = return_flash_attn_kwargs
        self.return_seq_idx = return_seq_idx

    def __call__(self, features: Sequence[dict]) -> dict:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for f in features:
            x, y = _as_list(f["input_ids"]), _as_list(f["labels"])
            _check_same_length(x, y)
            p = _as_list(f["position_ids"]) if "position_ids" in f else list(range(len(x)))
            if len(p) != len(x) or (p and p[0] != 0):
                raise ValueError("a packed feature's position_ids must match its input_ids and start at 0")
            ids += x
            labels += y
            positions += p
        starts = [i for i, p in enumerate(positions) if p == 0]
        for i in starts:
            labels[i] = IGNORE_INDEX  # no target crosses from one example into the next
        batch = {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
        }
        if self.return_flash_attn_kwargs:
            cu = starts + [len(ids)]
            cu_t = torch.tensor(cu, dtype=torch.int32)
            batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu_t
            batch["max_length_q"] = batch["max_length_k"] = max(b - a for a, b in itertools.pairwise(cu))
        if self.return_seq_idx:
            seq_idx = torch.zeros(len(ids), dtype=torch.int32)
            seq_idx[starts[1:]] = 1
            batch["seq_idx"] = seq_idx.cumsum(0, dtype=torch.int32)[None]
        return batch


def pack_examples(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Assign example indices to rows of at most `capacity` tokens, best-fit decreasing.

    Examples are placed longest first (ties: lower index first) into the open row with the least room that
    still fits them (ties: the older row), else into a new row. Deterministic; each index appears exactly
    once; within a row, indices are in placement order. An example longer than `capacity` (or empty) is a
    bug of the caller, who truncates before packing: it raises ValueError.
    """
    if capacity < 1:
        raise ValueError(f"capacity must be positive, got {capacity}")
    for i, n in enumerate(lengths):
        if not 1 <= n <= capacity:
            raise ValueError(f"example {i} has length {n}, outside 1..{capacity} (truncate before packing)")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, row number) of rows that can still take an example
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
        else:
            room, r = capacity, len(rows)
            rows.append([])
        rows[r].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    return rows


class PackedDataset(torch.utils.data.Dataset):
    """A dataset of packed rows: item r is the examples of row r concatenated, with restarting `position_ids`.

    `examples` is any indexable dataset of examples; `lengths` (their token counts) avoids reading every
    example when it is known already (a lazy dataset still has to tokenize everything once to know them).
    Labels are returned as given; `PackedCollator` masks the first label of each example. `lengths` on the
    result holds the row lengths (for `train_sampling_strategy="group_by_length"`, which is of little use on
    packed rows).
    """

    def __init__(self, examples, capacity: int, lengths: Sequence[int] | None = None):
        self.examples = examples
        self.capacity = capacity
        if lengths is None:
            lengths = [len(examples[i]["input_ids"]) for i in range(len(examples))]
        self.example_lengths = list(lengths)
        self.rows = pack_examples(self.example_lengths, capacity)
        self.lengths = [sum(self.example_lengths[i] for i in row) for row in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, r: int) -> dict[str, list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i in self.rows[r]:
            ex = self.examples[i]
            x = _as_list(ex["input_ids"])
            ids += x
            labels += _as_list(ex["labels"])
            positions += range(len(x))
        return {"input_ids": ids, "labels": labels, "position_ids": positions}

    def fill(self) -> float:
        """Share of the rows' capacity holding tokens (1.0 = no room wasted)."""
        return sum(self.lengths) / (len(self.rows) * self.capacity) if self.rows else 0.0


def _as_list(x) -> list[int]:
    return x.tolist() if hasattr(x, "tolist") else list(x)


def _check_same_length(ids: list[int], labels: list[int]) -> None:
    if len(ids) != len(labels):
        raise ValueError(f"input_ids and labels differ in length ({len(ids)} vs {len(labels)})")
