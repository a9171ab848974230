"""Notices: what a run tells its user, one line each, printed once, by the process that logs.

Every rank computes its notices; only the logging rank prints them (`setup_notices`), and `announce(...,
gather=True)` shows it what the other ranks said differently (for instance that they loaded the encoded data
from the cache the main process wrote), since those would otherwise never be seen.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable

LOGGER = "chatsft"
PREFIX = "[chatsft] "


class _RankFilter(logging.Filter):
    """Notices from the logging rank only; warnings (a rank's own trouble, such as the signal it got) from
    every rank."""

    def __init__(self, should_log: bool):
        super().__init__()
        self.should_log = should_log

    def filter(self, record: logging.LogRecord) -> bool:
        return self.should_log or record.levelno >= logging.WARNING


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return PREFIX + text if record.levelno == logging.INFO else text


def setup_notices(should_log: bool) -> Callable[[str], None]:
    """Route the `chatsft` logger to stdout (notices as `[chatsft] message`, on the logging rank only); return
    `say`."""
    logger = logging.getLogger(LOGGER)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        if getattr(handler, "chatsft", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler.chatsft = True
    handler.setFormatter(_Format())
    handler.addFilter(_RankFilter(should_log))
    logger.addHandler(handler)
    return logger.info


def announce(say: Callable[[str], None], notices: Iterable[str], *, gather: bool = False) -> None:
    """Say each notice; with `gather` (a collective under torch.distributed: every rank must call it) also
    what the other ranks said that this one did not."""
    notices = [n for n in notices if n]
    if gather:
        notices += other_ranks_notices(notices)
    for notice in notices:
        say(notice)


def other_ranks_notices(notices: list[str]) -> list[str]:
    """What the other processes said that the main one did not, as lines for the main process to print.

    Only the main process prints; this shows it what the others did differently (for instance that they loaded
    the encoded data from the cache the main process wrote). A notice the main process gave too, word for word
    or as the start of its own (which adds a detail such as the file it wrote), is not repeated. Each
    differing notice comes once, prefixed by the ranks that gave it (`ranks 1-7: ...`). A collective under
    torch.distributed (every rank must call it); empty without it, and on the ranks other than 0.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return []
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(notices))
    if dist.get_rank() != 0:
        return []
    mine = gathered[0] or []
    by_notice: dict[str, list[int]] = {}
    for rank, theirs in enumerate(gathered[1:], start=1):
        for notice in theirs or []:
            if not any(m.startswith(notice) for m in mine):
                by_notice.setdefault(notice, []).append(rank)
    return [f"{_ranks(ranks)}: {notice}" for notice, ranks in by_notice.items()]


def _ranks(ranks: list[int]) -> str:
    """`rank 3`, `ranks 1-7`, `ranks 1, 4-6`."""
    spans: list[str] = []
    start = prev = ranks[0]
    for r in [*ranks[1:], None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        spans.append(f"{start}" if start == prev else f"{start}-{prev}")
        if r is not None:
            start = prev = r
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(spans)
