"""Read conversation records from .json/.jsonl/.parquet files, validate them, and turn them into messages.

(skeleton: being written; the `Conversation` type below is the stable interface)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Conversation:
    """One accepted record as messages.

    `messages` are dicts `{"role": "system"|"user"|"assistant", "content": str}`; a system message, when present,
    is first; after it the roles alternate user, assistant, user, ... starting with user. It may end on a user
    turn (encoding ignores a trailing user turn). `id` is the record's id as a string, or its index in its file.
    """

    id: str
    messages: list[dict[str, str]]
    source: str = ""
    index: int = 0
