"""The packages depend on each other in one direction (a test walks every import, cycles refused), and sdrt.engine is
the lean runtime: importing and running it loads none of the application packages (export, serve,
benchmarks, demo, cli) nor torch, diffusers or transformers. Checked twice: what a real run loads (sys.modules in a
fresh interpreter), and every import statement written under engine/ at any depth (function-local ones included)."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import sdrt.engine

FORBIDDEN = ("sdrt.export", "sdrt.serve", "sdrt.benchmarks", "sdrt.demo", "sdrt.cli", "torch", "diffusers", "transformers")
ENGINE_DIR = Path(sdrt.engine.__file__).parent


def _forbidden(module: str) -> bool:
    return any(module == name or module.startswith(f"{name}.") for name in FORBIDDEN)


def test_loading_and_generating_with_the_engine_loads_no_application_package(tiny_bundle: Path) -> None:
    script = f"""
import json, sys
import sdrt.engine

pipe = sdrt.engine.load({str(tiny_bundle)!r}, backend="onnxruntime-cpu", safety_checker=False)
pipe.set_progress_bar_config(disable=True)
out = pipe("a red circle", num_inference_steps=2, seed=0)
assert len(out.images) == 1 and out.images[0].mode == "RGB", out.images
print(json.dumps(sorted(sys.modules)))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    modules = json.loads(result.stdout.splitlines()[-1])
    assert "sdrt.engine.pipeline" in modules  # the run happened in this interpreter
    assert [m for m in modules if _forbidden(m)] == []


def _imported_modules(tree: ast.AST) -> list[str]:
    """Every module an import statement anywhere in `tree` names (absolute imports; engine/ writes no relative ones)."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module is not None:
            names.append(node.module)
    return names


def test_no_engine_module_imports_an_application_package_at_any_depth() -> None:
    sources = sorted(ENGINE_DIR.rglob("*.py"))
    assert len(sources) > 20  # the walk found the engine's modules
    offenders = [f"{path.relative_to(ENGINE_DIR)}: {module}" for path in sources
                 for module in _imported_modules(ast.parse(path.read_text(encoding="utf-8"))) if _forbidden(module)]
    assert offenders == []


PACKAGES = ("engine", "export", "serve", "benchmarks", "demo", "cli")


def _package_graph() -> dict[str, set[str]]:
    """sdrt package -> the other sdrt packages its modules import, at any depth (function-local imports included)."""
    root = ENGINE_DIR.parent
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        imported = {module.split(".")[1] for path in (root / package).rglob("*.py")
                    for module in _imported_modules(ast.parse(path.read_text(encoding="utf-8")))
                    if module.startswith("sdrt.") and module.count(".") >= 1}
        graph[package] = imported & set(PACKAGES) - {package}
    return graph


def test_the_packages_import_each_other_without_a_cycle() -> None:
    graph = _package_graph()
    assert graph["cli"] >= {"engine", "export", "serve", "benchmarks", "demo"}  # the walk sees the lazy imports too
    cycles = [(a, b) for a in graph for b in graph[a] if a in graph[b]]
    order: list[str] = []
    remaining = {package: set(deps) for package, deps in graph.items()}
    while remaining:
        ready = sorted(package for package, deps in remaining.items() if not deps - set(order))
        assert ready, f"a cycle among {sorted(remaining)}: {remaining} (pairs: {cycles})"
        order.extend(ready)
        for package in ready:
            del remaining[package]
    assert order[0] == "engine"
