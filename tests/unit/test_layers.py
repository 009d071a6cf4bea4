"""The import graph: no circle, and no import from a lower layer to a higher one.

Layers, lowest first: errors and sys (subprocess, LVM, dm, loop, fs); guest and vm (the guest
emulator, the lab VM); lab (substrate, state, run records); backup; flow; cli (with its guest
and flow commands), bench (with soak) and the pytest plugin (hvlab_fixtures). A module may
import its own layer's package and lower layers; within a layer, backup never imports flow.
The folder is the import path: harness/hvlab/flow/engine.py is hvlab.flow.engine.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYER = {"errors": 0, "console": 0, "sys": 0, "guest": 1, "vm": 1, "lab": 2, "backup": 3, "flow": 4,
         "report": 5, "cli": 5, "bench": 5, "hvlab_fixtures": 5}
SOURCE_ROOTS = (ROOT / "harness", ROOT / "fixtures")


def _modules() -> dict[str, Path]:
    out = {}
    for root in SOURCE_ROOTS:
        for p in root.rglob("*.py"):
            parts = p.relative_to(root).with_suffix("").parts
            out[".".join(parts).removesuffix(".__init__")] = p
    return out


def _imports(path: Path, known: set[str]) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hvlab"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("hvlab"))
    return out


def _package(mod: str) -> str:
    """The layer's name: hvlab.<package>, or the plugin's own top-level package."""
    parts = mod.split(".")
    return parts[0] if parts[0] != "hvlab" else parts[1]


def test_no_import_goes_up_a_layer() -> None:
    mods = _modules()
    bad = []
    for mod, path in mods.items():
        for target in _imports(path, set(mods)):
            a, b = _package(mod), _package(target)
            if LAYER[b] > LAYER[a]:
                bad.append(f"{mod} -> {target}")
    assert not bad, "upward imports: " + "; ".join(sorted(bad))


def test_no_import_circle() -> None:
    mods = _modules()
    graph = {m: {t for t in _imports(p, set(mods)) if t in mods} for m, p in mods.items()}
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join([*stack[stack.index(t):], t]))
            elif t not in state:
                visit(t, [*stack, t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import circles: " + "; ".join(cycles)
