"""The import rules of docs/architecture.md, checked on the source: imports run one way (from a module to
modules of lower layers, or within its own package), nothing reaches another module's private names, and
nothing in the package imports third_party/."""

import ast
import pathlib
import sys

import pytest

from debkd_jax import processes

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "debkd_jax"

LAYERS = {
    "errors": 0,
    "method_configs": 0,
    "xla_cpu": 0,
    "console": 0,
    "native": 1,
    "processes": 0,
    "targets": 1,
    "losses": 2,
    "metrics": 2,
    "methods": 3,
    "models": 3,
    "workdir_lib": 3,
    "data": 4,
    "report": 4,
    "config_checks": 3,
    "config_lib": 4,
    "supervisor": 4,
    "teachers": 4,
    "training": 5,
    "cli": 5,
    "pipeline": 6,
    "export": 6,
    "sweep": 7,
    "main": 7,
    "predict": 7,
    "render": 7,
}
CORE = ("targets", "losses", "metrics")


def _unit(path: pathlib.Path) -> str:
    """The top-level unit of the package a file belongs to: 'training' for training/step.py."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _sources():
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def _imports(tree: ast.AST):
    """(imported debkd_jax unit, imported names, line) for every import of the package in `tree`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "debkd_jax":
            parts = node.module.split(".")
            for alias in node.names:
                unit = parts[1] if len(parts) > 1 else alias.name
                yield unit, alias.name, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "debkd_jax" and len(parts) > 1:
                    yield parts[1], parts[-1], node.lineno
                if parts[0] in ("third_party", "torch_peer", "torch"):
                    yield parts[0], parts[-1], node.lineno


def test_every_unit_has_a_layer():
    units = {_unit(p) for p in _sources()}
    assert units <= set(LAYERS), f"add {sorted(units - set(LAYERS))} to LAYERS and docs/architecture.md"


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_one_way(path):
    unit = _unit(path)
    tree = ast.parse(path.read_text())
    for imported, name, line in _imports(tree):
        where = f"{path.relative_to(PACKAGE)}:{line}"
        assert imported not in ("third_party", "torch_peer", "torch"), f"{where} imports {imported}"
        if imported == unit:
            continue
        assert imported in LAYERS, f"{where}: unknown unit {imported}"
        assert LAYERS[imported] < LAYERS[unit], f"{where}: {unit} (layer {LAYERS[unit]}) imports {imported}"
        if unit in CORE:
            assert imported in CORE or imported == "errors", f"{where}: the core imports {imported}"
        assert not name.startswith("_"), f"{where} imports the private name {name}"


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_attribute_of_another_module(path):
    tree = ast.parse(path.read_text())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("debkd_jax"):
            modules |= {a.asname or a.name for a in node.names}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            assert not node.attr.startswith("_"), (
                f"{path.relative_to(PACKAGE)}:{node.lineno} reads {node.value.id}.{node.attr}"
            )


MAX_LINES = 440
"""No module over about 400 lines (10% of slack): a module that grows past it is split by concern."""


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines: split it by concern"


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_progress_bars_come_from_console(path):
    """One progress bar (`console.progress`): nothing else imports tqdm."""
    if path.name == "console.py":
        return
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        assert not any(n.split(".")[0] == "tqdm" for n in names), (
            f"{path.relative_to(PACKAGE)}:{node.lineno} imports tqdm; use debkd_jax.console.progress"
        )


def test_the_launching_process_and_config_files_start_without_jax():
    """A distributed job's launching process (`debkd_jax.supervisor`) loads the command line and its config
    file, then only watches its child: that takes no JAX, Flax or TensorFlow (seconds of every launch). The
    package's names still import on first use."""
    script = """
import sys
import debkd_jax.main
from debkd_jax import cli, config_lib, supervisor
for spec in ("configs/debkd.py", "configs/imagenet.py:smoke", "configs/methods.py:smoke", "configs/study.py"):
    config_lib.load_config(spec)
heavy = sorted(m for m in ("jax", "flax", "optax", "tensorflow", "torch") if m in sys.modules)
import debkd_jax
assert set(debkd_jax.__all__) <= set(dir(debkd_jax)) and all(getattr(debkd_jax, n) for n in debkd_jax.__all__)
from debkd_jax import Targets, debkd_loss
print(heavy, debkd_loss.__module__, Targets.__module__)
"""
    proc = processes.run(
        [sys.executable, "-c", script], cwd=PACKAGE.parent, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["[]", "debkd_jax.losses", "debkd_jax.targets"], proc.stdout
