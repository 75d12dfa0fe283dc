"""The package's shape: layers whose imports only go down, small modules, one set of defaults."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipeline.config import Params, load_params

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "pipeline"
MAX_LINES = 400

# What each folder may import from the package (besides itself). Top-level config/errors/layout
# are shared by all; `progress` is the console's progress bar and local pool, for sources and stages;
# `ray_engine` the same map on a Ray cluster, for stages.
ALLOWED = {
    "core": {"config", "errors"},
    "io": {"core", "config", "errors", "layout"},
    "sources": {"io", "core", "config", "errors", "layout", "progress"},
    "tracking": {"io", "core", "config", "errors", "layout"},
    "reporting": {"io", "core", "config", "errors", "layout"},
    "stages": {"tracking", "reporting", "sources", "io", "core", "config", "errors", "layout", "progress",
               "ray_engine"},
    "config": {"errors"},
    "errors": set(),
    "layout": {"config"},
    "progress": set(),
    "ray_engine": {"progress", "errors"},
}
FORBIDDEN_THIRD_PARTY = {"core": {"mlflow", "typer", "rich", "dvc"}}


def _modules(package: Path = PACKAGE) -> list[Path]:
    return sorted(p for p in package.rglob("*.py") if "__pycache__" not in p.parts)


def _layer(path: Path, package: Path = PACKAGE) -> str:
    rel = path.relative_to(package)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module an import statement names, also inside functions (lazy imports count)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            if node.module == "pipeline":
                out += [(node.lineno, f"pipeline.{a.name}") for a in node.names]
    return out


def layer_violations(package: Path = PACKAGE) -> list[str]:
    bad = []
    for path in _modules(package):
        layer = _layer(path, package)
        if layer == "cli" or layer == "__init__":
            continue
        allowed = ALLOWED[layer]
        rel = path.relative_to(package.parent)
        for line, name in _imports(path):
            parts = name.split(".")
            if parts[0] == "pipeline" and len(parts) > 1:
                target = parts[1]
                if target == layer:
                    if layer == "stages" and len(parts) > 2 and f"{parts[2]}.py" != path.name:
                        bad.append(f"{rel}:{line} stage imports another stage: {name}")
                    continue
                if target not in allowed:
                    bad.append(f"{rel}:{line} {layer} may not import {name}")
            elif parts[0] in FORBIDDEN_THIRD_PARTY.get(layer, ()):
                bad.append(f"{rel}:{line} {layer} may not import {parts[0]}")
    return bad


def test_imports_only_go_down():
    assert layer_violations() == []


def test_the_walker_sees_violations(tmp_path):
    """The check itself: a core module that imports a stage, MLflow or rich is reported."""
    fake = tmp_path / "pipeline"
    (fake / "core").mkdir(parents=True)
    (fake / "stages").mkdir()
    (fake / "core" / "bad.py").write_text("import mlflow\n\ndef f():\n    from pipeline.stages.train import x\n")
    (fake / "stages" / "a.py").write_text("from pipeline.stages.b import y\nfrom pipeline.core import z\n")
    found = layer_violations(fake)
    assert any("core may not import mlflow" in v for v in found)
    assert any("core may not import pipeline.stages.train" in v for v in found)
    assert any("stage imports another stage: pipeline.stages.b" in v for v in found)
    assert len(found) == 3, found  # stages -> core is allowed


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_is_small(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(REPO)} has {n} lines (max {MAX_LINES}): split it by concern"


def test_every_folder_is_a_known_layer():
    layers = {_layer(p) for p in _modules()} - {"cli", "__init__"}
    assert layers <= set(ALLOWED), layers - set(ALLOWED)


def test_defaults_equal_the_shipped_params():
    """`Params()` is what tests and library users get; it must be the network and recipe that ships."""
    shipped = load_params(REPO / "configs" / "params.yaml")
    assert Params().model_dump(mode="json") == shipped.model_dump(mode="json")


# ----------------------------------------------------------------------------- DVC knows what each stage runs
PRESENTATION = {"pipeline/cli.py", "pipeline/progress.py"}  # how results are shown, not what they are


def _module_file(name: str) -> Path | None:
    path = REPO / Path(*name.split("."))
    if path.with_suffix(".py").exists():
        return path.with_suffix(".py")
    if (path / "__init__.py").exists():
        return path / "__init__.py"
    return None


def _closure(start: Path) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        rel = str(path.relative_to(REPO))
        if rel in seen:
            continue
        seen.add(rel)
        for _, name in _imports(path):
            if name.split(".")[0] == "pipeline" and (f := _module_file(name)) is not None:
                todo.append(f)
    return {p for p in seen if not p.endswith("__init__.py")} - PRESENTATION


def test_dvc_code_deps_cover_every_module_a_stage_imports():
    import yaml

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    missing = {}
    for name, stage in stages.items():
        module = REPO / "pipeline" / "stages" / f"{stage['cmd'].split()[1]}.py"
        deps = [str(d).rstrip("/") for d in stage["deps"]]
        uncovered = [m for m in sorted(_closure(module)) if not any(m == d or m.startswith(d + "/") for d in deps)]
        if uncovered:
            missing[name] = uncovered
    assert missing == {}


def test_stages_that_read_the_manifest_depend_on_it():
    import yaml

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name in ("ingest", "explain"):
        assert "${data.manifest}" in stages[name]["deps"], name
    assert "data/ingested/masks" in stages["explain"]["deps"]  # a mask edit re-runs ingest, then explain
