"""The package's layout: no import circle between fercache's modules, and one home per concern.

Reads the sources only (no import), so it takes milliseconds.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fercache"


def _runtime_nodes(tree: ast.AST):
    """Every node but those under `if TYPE_CHECKING:` (imports for annotations only never run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in (child, *_runtime_nodes(child)))
            continue
        yield node
        yield from _runtime_nodes(node)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the fercache modules it imports when run, at the top or inside a function alike."""
    modules = {p.stem for p in package.glob("*.py")}
    graph = {}
    for path in package.glob("*.py"):
        deps = set()
        for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "fercache":
                deps |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fercache."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("fercache.")}
        graph[path.stem] = deps - {path.stem}
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        return exc.args[1]
    return None


def test_the_checker_finds_a_circle(tmp_path):
    (tmp_path / "a.py").write_text("def f():\n    from fercache.b import g\n")
    (tmp_path / "b.py").write_text("from fercache import a\n")
    (tmp_path / "c.py").write_text("import fercache.a\n")
    (tmp_path / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fercache.e import E\n"
                                   "else:\n    import fercache.c\n")
    (tmp_path / "e.py").write_text("from fercache.d import f\n")
    assert import_graph(tmp_path) == {"a": {"b"}, "b": {"a"}, "c": {"a"}, "d": {"c"}, "e": {"d"}}
    assert set(cycle(import_graph(tmp_path))) == {"a", "b"}


def test_no_import_circle():
    graph = import_graph()
    assert {"fit", "finetune", "runs", "stats"} <= set(graph)
    assert cycle(graph) is None, f"fercache modules import each other in a circle: {' -> '.join(cycle(graph))}"


def test_run_folders_and_figures_have_one_home():
    """fit, finetune and evaluate write through `runs`; every figure is `stats`'; old names still work."""
    graph = import_graph()
    assert "fit" not in graph["finetune"] and "fit" not in graph["probe"]
    import fercache.fit as fit
    import fercache.report as report
    import fercache.runs as runs
    import fercache.stats as stats

    for name in ("PREDICTIONS", "read_predictions", "write_predictions", "write_run", "write_evaluation",
                 "resolve_cache"):
        assert getattr(fit, name) is getattr(runs, name)
    for name in ("score_predictions", "test_figures", "classification_metrics"):
        assert getattr(fit, name) is getattr(stats, name)
    assert report.classification_metrics is stats.classification_metrics
    assert not hasattr(runs, "classification_metrics") and not hasattr(report, "score_predictions")

