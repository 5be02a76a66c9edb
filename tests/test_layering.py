"""The engine's layering: configs read without torch, no import cycle among engine modules, data below physics.

Cycles are looked for in every import statement, including those inside
functions (a lazy import hides a cycle from Python, not from a reader).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parents[1] / "engine"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ENGINE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def engine_import_graph() -> dict[str, set[str]]:
    """module -> the engine modules it imports anywhere in its source."""
    files = {_module_name(p): p for p in ENGINE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                targets.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycle_inside_engine():
    graph = engine_import_graph()
    assert "engine.data.loading" in graph and "engine.data.scans" in graph["engine.data.loading"]
    assert cycles(graph) == []


def test_reading_a_config_does_not_import_torch():
    code = ("import sys, engine.config as c; c.builtin_config('mri_brain').validate(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ENGINE.parent, timeout=120)
    assert result.returncode == 0, result.stderr


def test_solver_registry_is_what_configs_validate_against():
    from engine import config, solvers
    from engine.solver_names import SOLVER_NAMES

    assert set(solvers.SOLVERS) == set(SOLVER_NAMES)
    choices = {f.name: f.metadata["choices"] for f in config.fields(config.SolverConfig)}
    assert choices["name"] == SOLVER_NAMES and choices["fallback"] == ("",) + SOLVER_NAMES
    for name in SOLVER_NAMES:
        assert solvers.get_solver(name) is solvers.SOLVERS[name]


def test_a_solver_outside_the_names_cannot_register():
    from engine.errors import ConfigError
    from engine.solvers import get_solver
    from engine.solvers.base import register_solver

    with pytest.raises(ValueError, match="not in engine.solver_names"):
        register_solver("newton")
    with pytest.raises(ValueError, match="registered twice"):
        register_solver("anderson")
    with pytest.raises(ConfigError, match="unknown solver 'newton'"):
        get_solver("newton")


def test_the_data_layer_does_not_import_physics():
    """engine/data/ holds arrays and metadata; operators are built from it above (engine.measured), never inside."""
    graph = engine_import_graph()
    data = {m for m in graph if m == "engine.data" or m.startswith("engine.data.")}
    assert "engine.data.measurements" in data
    reached, todo = set(), list(data)
    while todo:  # everything the data layer imports, directly or through other engine modules
        for target in graph[todo.pop()]:
            if target not in reached:
                reached.add(target)
                todo.append(target)
    assert "engine.physics" not in reached


def test_config_and_checkpoint_suffixes_have_one_torch_free_home(tmp_path):
    from engine.config import (CHECKPOINT_FORMATS, CHECKPOINT_SUFFIXES, CONFIG_SUFFIXES, ExperimentConfig, RunConfig,
                               load_config, save_config)
    from engine.errors import ConfigError

    config = ExperimentConfig().replace(**{"solver.tol": 1e-5})
    for suffix in CONFIG_SUFFIXES:  # every listed suffix is written and read back
        save_config(config, tmp_path / f"c{suffix}")
        assert load_config(tmp_path / f"c{suffix}") == config
    with pytest.raises(ConfigError, match="must end in"):
        save_config(config, tmp_path / "c.json")
    assert set(CHECKPOINT_SUFFIXES) == {s for suffixes in CHECKPOINT_FORMATS.values() for s in suffixes}
    assert RunConfig.__dataclass_fields__["checkpoint_format"].metadata["choices"] == tuple(CHECKPOINT_FORMATS)
