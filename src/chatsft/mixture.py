"""A data mixture: several sources, each with its own options, sampled deterministically record by record.

A `DataSource` is a file, a folder (of shards, or `datasets.save_to_disk`) or a Hub name, with:
- `weight` (a sampling ratio: each accepted conversation is used `weight` times on average: 0.25 keeps a
  random quarter, 1 all, 2.5 every one twice and a random half a third time) or `max_samples` (its first N
  accepted conversations, in file order), not both;
- `conv_template`, `loss_mode` and `system` (a system prompt given to its conversations that have none);
- `fields` (our key -> the source's key, at record and turn level: `{conversations: dialog, from: speaker,
  value: text}`) and `roles` (the source's role name -> ours: `{Bot: assistant}`) for non-standard data.

The draw for a conversation is a hash of (seed, source name, conversation id), not a random stream: it does
not depend on the order or number of other records, needs no memory, and is the same in every process. The
kept count of a source with N conversations and weight w = k + f (0 <= f < 1) is kN plus a binomial(N, f)
draw: its standard deviation is sqrt(N f (1 - f)), at most sqrt(N)/2.

Command line: `--datasets PATH[::key=value,key=value,...]` (`fields.from=speaker`, `roles.Bot=assistant`), or
one JSON object per entry (what a `datasets:` list in a `--config` YAML becomes).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace

from chatsft.encode import LOSS_MODES, Encoder
from chatsft.errors import ConfigError
from chatsft.records import Conversation

OPTIONS = ("path", "name", "weight", "max_samples", "conv_template", "loss_mode", "system", "fields", "roles")


@dataclass(frozen=True)
class DataSource:
    path: str
    name: str = ""
    weight: float | None = None
    max_samples: int | None = None
    conv_template: str | None = None
    loss_mode: str | None = None
    system: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        where = f"dataset {self.path!r}"
        if not self.name:
            object.__setattr__(self, "name", self.path)
        if self.weight is not None and self.max_samples is not None:
            raise ConfigError(f"{where}: give weight or max_samples, not both")
        if self.weight is not None and not (
            isinstance(self.weight, (int, float)) and 0 < self.weight < math.inf
        ):
            raise ConfigError(f"{where}: weight must be a number above 0, got {self.weight!r}")
        if self.max_samples is not None and (not isinstance(self.max_samples, int) or self.max_samples < 1):
            raise ConfigError(
                f"{where}: max_samples must be a whole number of at least 1, got {self.max_samples!r}"
            )
        if self.loss_mode is not None and self.loss_mode not in LOSS_MODES:
            raise ConfigError(
                f"{where}: loss_mode must be one of {', '.join(LOSS_MODES)}, got {self.loss_mode!r}"
            )
        for name in ("fields", "roles"):
            value = getattr(self, name)
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                raise ConfigError(f"{where}: {name} must map names to names, got {value!r}")

    def key(self) -> str:
        """What of this source changes the examples (its data is fingerprinted separately)."""
        return json.dumps({k: v for k, v in asdict(self).items() if k != "path"}, sort_keys=True)

    def prepare(self):
        """The raw-record mapping for `fields`/`roles`, or None when the source needs none."""
        if not self.fields and not self.roles:
            return None
        fields, roles = dict(self.fields), dict(self.roles)

        def mapped(_source, raw):
            if not isinstance(raw, dict):
                return raw
            raw = _rename(raw, fields)
            for key in ("conversations", "messages"):
                turns = raw.get(key)
                if isinstance(turns, list):
                    raw[key] = [_turn(t, fields, roles) for t in turns]
            return raw

        return mapped

    def with_system(self, conv: Conversation) -> Conversation:
        if self.system is None or (conv.messages and conv.messages[0]["role"] == "system"):
            return conv
        return replace(conv, messages=[{"role": "system", "content": self.system}, *conv.messages])

    def copies(self, conv: Conversation, seed: int) -> int:
        """How many times this conversation is used (0 = not drawn)."""
        if self.weight is None:
            return 1
        whole, part = divmod(float(self.weight), 1.0)
        return int(whole) + (part > 0 and uniform(seed, self.name, conv.id) < part)

    def encoder(self, default: Encoder) -> Encoder:
        if self.conv_template is None and self.loss_mode is None:
            return default
        from chatsft.templates import get_template

        template = (
            get_template(self.conv_template, default.tokenizer)[0] if self.conv_template else default.template
        )
        return Encoder(template, default.tokenizer, self.loss_mode or default.loss_mode, default.max_length)


def uniform(seed: int, *parts: str) -> float:
    """A number in [0, 1) that depends only on its arguments (the same in every process and run)."""
    h = hashlib.blake2b(f"{seed}\0{chr(0).join(parts)}".encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(h.digest(), "big") / 2**64


def _rename(obj: dict, fields: dict[str, str]) -> dict:
    obj = dict(obj)
    for ours, theirs in fields.items():
        if theirs in obj and ours not in obj:
            obj[ours] = obj.pop(theirs)
    return obj


def _turn(turn, fields, roles):
    if not isinstance(turn, dict):
        return turn
    turn = _rename(turn, fields)
    for key in ("from", "role"):
        if isinstance(turn.get(key), str) and turn[key] in roles:
            turn[key] = roles[turn[key]]
    return turn


def parse_source(text: str) -> DataSource:
    """One `--datasets` entry: a JSON object, or `PATH[::key=value,...]`."""
    if text.lstrip().startswith("{"):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--datasets {text[:80]!r}: not valid JSON: {e.msg}") from None
    else:
        path, _, options = text.partition("::")
        spec = {"path": path}
        for item in filter(None, options.split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                raise ConfigError(f"--datasets {text!r}: {item!r} is not key=value")
            group, dot, sub = key.partition(".")
            if dot:
                spec.setdefault(group, {})[sub] = value
            else:
                spec[key] = _number(value) if key in ("weight", "max_samples") else value
    if not isinstance(spec, dict) or not isinstance(spec.get("path"), str) or not spec["path"]:
        raise ConfigError(f"--datasets {text[:80]!r}: each entry needs a path")
    unknown = sorted(set(spec) - set(OPTIONS))
    if unknown:
        raise ConfigError(
            f"--datasets {spec['path']!r}: unknown option(s) {', '.join(unknown)}; "
            f"known: {', '.join(OPTIONS)}"
        )
    return DataSource(**spec)


def _number(value: str):
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            return value  # DataSource says what is wrong with it
