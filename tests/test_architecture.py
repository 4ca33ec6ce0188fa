"""The folder tree is the architecture: rooms in layers, arrows only downwards, no import loops.

Every import counts, also the ones inside functions (they hide loops, they do not break them).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("nexus_core", "producer", "workers", "nexus")

# nexus_core's rooms, lowest first: a module may import its own room and the rooms below it.
ROOMS = [
    {"nexus_core.errors", "nexus_core.paths", "nexus_core.config", "nexus_core.data", "nexus_core.context",
     "nexus_core.broker", "nexus_core.progress"},
    {"nexus_core.storage"},
    {"nexus_core.records"},
    {"nexus_core.teachers"},
    {"nexus_core.kd"},
    {"nexus_core.stages"},
    {"nexus_core.demo"},
]


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = p
    return out


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Project modules that `path` imports anywhere (module level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                found.add(full if full in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.split(".")[0] in PACKAGES}


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def _room(module: str) -> int | None:
    for rank, room in enumerate(ROOMS):
        if any(module == r or module.startswith(r + ".") for r in room):
            return rank
    return None


def test_every_nexus_core_module_lives_in_a_room():
    homeless = [m for m in MODULES if m.startswith("nexus_core.") and _room(m) is None]
    assert not homeless, f"modules outside the rooms of this test: {homeless}"


def test_no_room_imports_a_higher_one():
    upward = [(m, d) for m, deps in GRAPH.items() if m.startswith("nexus_core.")
              for d in deps if d.startswith("nexus_core.") and _room(d) is not None and _room(d) > _room(m)]
    assert not upward, f"imports that point up the stack: {upward}"


def test_the_library_knows_nothing_of_the_processes_around_it():
    bad = [(m, d) for m, deps in GRAPH.items() if m.startswith("nexus_core") for d in deps
           if d.split(".")[0] in ("producer", "workers", "nexus")]
    assert not bad, bad
    rq_users = [m for m, p in MODULES.items() if m.startswith("nexus_core")
                and any(isinstance(n, (ast.Import, ast.ImportFrom)) and "rq" in
                        ([a.name.split(".")[0] for a in n.names] if isinstance(n, ast.Import)
                         else [(n.module or "").split(".")[0]]) for n in ast.walk(ast.parse(p.read_text())))]
    assert not rq_users, f"nexus_core must not import RQ: {rq_users}"
    crossed = [(m, d) for m, deps in GRAPH.items() for d in deps
               if {m.split(".")[0], d.split(".")[0]} == {"producer", "workers"}]
    assert not crossed, f"producer and workers never import each other: {crossed}"


def test_no_import_loops():
    state: dict[str, int] = {}  # 1 visiting, 2 done
    loops = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(GRAPH.get(m, ())):
            if d not in GRAPH:
                continue
            if state.get(d) == 1:
                loops.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    assert not loops, f"import loops: {loops}"
