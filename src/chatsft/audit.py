"""The audit of a data set: what happened to every record, and whether each trained reply ends in a stop
token.

`Audit.add` takes each record's `Encoded` result (examples, truncation, drops, the rejection reason) and
counts it; the check that matters most is the last one: a trained assistant turn must end in a token that
stops generation (`Encoder.stop_ids`), or the model learns to stop on a token that inference will not stop on.
`chatsft prepare` writes the audit beside the examples; training writes it into the final model's folder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from chatsft.encode import IGNORE_INDEX, Encoded


@dataclass
class Audit:
    """Counts over a data set, and the check that each trained reply ends in a token that stops generation."""

    stop_ids: tuple[int, ...] = ()
    records: int = 0
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    first_rejected: dict[str, str] = field(default_factory=dict)
    trained_turns: int = 0
    turns_end_in_stop: int = 0
    # yuan2 assistant_turns: a non-final reply ends in '<n>' by FastChat's format
    turns_end_in_separator: int = 0
    turns_cut: int = 0
    turns_missing_stop: dict[str, int] = field(default_factory=dict)  # marker -> count: no stop there
    # what a Jinja template changed or decided ("reply text trimmed by the template": N, records split, ...)
    template_notes: dict[str, int] = field(default_factory=dict)

    def add(self, result: Encoded) -> None:
        self.records += 1
        for note, n in result.notes.items():
            self.template_notes[note] = self.template_notes.get(note, 0) + n
        if result.rejected:
            self.rejected[result.rejected] = self.rejected.get(result.rejected, 0) + 1
            self.first_rejected.setdefault(result.rejected, result.id)
            return
        self.truncated += result.truncated
        self.dropped += result.dropped
        for ex in result.examples:
            self.examples += 1
            self.tokens += len(ex.input_ids)
            self.trained_tokens += len(ex.labels) - ex.labels.count(IGNORE_INDEX)
        for end in result.turn_ends:
            self.trained_turns += 1
            if end.token_id is None:
                self.turns_cut += 1
            elif not end.stops:
                self.turns_end_in_separator += 1
            elif end.token_id in self.stop_ids:
                self.turns_end_in_stop += 1
            else:
                self.turns_missing_stop[end.marker] = self.turns_missing_stop.get(end.marker, 0) + 1

    def add_read(self, report) -> None:
        """Count the records that validation rejected before encoding (a `report.ReadReport`), so that the
        audit covers every record read: `records` becomes the records read, `rejected` holds both kinds."""
        self.records += report.rejected_total
        for reason, n in report.rejected.items():
            self.rejected[reason] = self.rejected.get(reason, 0) + n
        first = report.first_problem
        if first is not None and first.reason in report.rejected:
            self.first_rejected.setdefault(
                first.reason, first.id if first.id is not None else str(first.index)
            )

    @property
    def ok(self) -> bool:
        return not self.turns_missing_stop

    def merge(self, part: Audit) -> None:
        """Add the counts of `part` (another chunk of the same data set) to these."""
        for f in fields(Audit):
            if f.name == "stop_ids":
                continue
            mine, theirs = getattr(self, f.name), getattr(part, f.name)
            if isinstance(mine, dict):
                for key, value in theirs.items():
                    if f.name == "first_rejected":
                        mine.setdefault(key, value)
                    else:
                        mine[key] = mine.get(key, 0) + value
            else:
                setattr(self, f.name, mine + theirs)

    def to_dict(self) -> dict:
        return {**asdict(self), "stop_ids": list(self.stop_ids), "ok": self.ok}

    @classmethod
    def from_dict(cls, data: dict) -> Audit:
        """The Audit that `to_dict` wrote (extra keys such as "ok" are ignored)."""
        names = {f.name for f in fields(cls)}
        audit = cls(**{k: v for k, v in data.items() if k in names})
        audit.stop_ids = tuple(audit.stop_ids)
        return audit

    def write(self, path) -> None:
        Path(path).write_text(
            json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )

    def format(self) -> str:
        pct = f" ({100 * self.trained_tokens / self.tokens:.1f}%)" if self.tokens else ""
        rows = [
            ("records", self.records),
            ("rejected", sum(self.rejected.values())),
            ("examples", self.examples),
            ("truncated", self.truncated),
            ("dropped (nothing left to train)", self.dropped),
            ("tokens", self.tokens),
            ("trained tokens", f"{self.trained_tokens}{pct}"),
            ("trained turns", self.trained_turns),
            ("  end in a stop token", self.turns_end_in_stop),
        ]
        if self.turns_end_in_separator:
            rows.append(("  end in '<n>' (yuan2 format)", self.turns_end_in_separator))
        if self.turns_cut:
            rows.append(("  cut by truncation", self.turns_cut))
        rows += [(f"  end in {m!r}, not a stop id", n) for m, n in self.turns_missing_stop.items()]
        rows += [(f"template: {note}", n) for note, n in sorted(self.template_notes.items())]
        rows += [
            (f"rejected: {r}", f"{n} (first: {self.first_rejected[r]})")
            for r, n in sorted(self.rejected.items())
        ]
        width = max(len(name) for name, _ in rows)
        lines = [f"{name:<{width}}  {value}" for name, value in rows]
        if self.turns_missing_stop:
            lines.append(
                f"warning: generation stops on ids {list(self.stop_ids)}; add the end-of-turn token's id "
                "to generation_config.eos_token_id or the model will not stop"
            )
        return "\n".join(lines)
