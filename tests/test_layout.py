"""The package's three floors, read from every module's imports (function-local ones included): the pipeline
library imports neither floor above it and no torch (collate excepted: it builds tensors); training never
imports the commands; a command imports no other command (`cli` dispatches to them by name)."""

from __future__ import annotations

import ast
from pathlib import Path

import chatsft

PACKAGE = Path(chatsft.__file__).parent
ENTRY_POINTS = {"chatsft.train", "chatsft.__main__"}  # thin aliases of the commands, for `python -m`


def imports() -> dict[str, set[str]]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(("chatsft", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(
            ".__init__"
        )
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[module] = names
    return found


def floor(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in ("training", "commands") else "library"


def test_imports_point_down_only():
    table = imports()
    assert len([m for m in table if floor(m) == "library"]) >= 10 and "chatsft.commands.train" in table
    wrong = []
    for module, names in table.items():
        if module in ENTRY_POINTS:
            continue
        for name in names:
            if not name.startswith("chatsft.") or name == module:
                continue
            if floor(module) == "library" and floor(name) != "library":
                wrong.append(f"{module} -> {name}")
            if floor(module) == "training" and floor(name) == "commands":
                wrong.append(f"{module} -> {name}")
            if floor(module) == "commands" and floor(name) == "commands" and name != "chatsft.commands":
                wrong.append(f"{module} -> {name}")
    assert wrong == []


def test_library_needs_no_torch_but_collate():
    users = sorted(
        m
        for m, names in imports().items()
        if floor(m) == "library"
        and m not in ENTRY_POINTS
        and any(n == "torch" or n.startswith("torch.") for n in names)
    )
    assert users == ["chatsft.collate"]
