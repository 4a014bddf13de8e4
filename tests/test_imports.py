"""Imports run one way: kpsvd.py, rank_select.py <- soka/ <- model.py <- train.py <- benchmarks/, experiments/.

Read from the source (ast), not by importing: every `import` and `from ... import` of a project
module, wherever it stands, is an edge. A module may import only from its own tier or a lower one;
the graph has no circle (importing soka.gguf from outside soka/ runs soka/__init__.py first, so it
counts as an import of both); and no project module is imported inside a function (an import deferred
to dodge a circle). Third-party imports are free.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIERS = [("kpsvd", "rank_select"), ("soka",), ("model",), ("train",), ("benchmarks", "experiments")]
TIER = {name: i for i, names in enumerate(TIERS) for name in names}


def module_name(path):
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources():
    files = [ROOT / f"{m}.py" for m in ("kpsvd", "rank_select", "model", "train")]
    for folder in ("soka", "benchmarks", "experiments"):
        files += sorted((ROOT / folder).glob("*.py"))
    return {module_name(f): f for f in files}


MODULES = sources()
# benchmarks/ scripts import each other by their bare names (the folder is on sys.path when they run)
BARE = {name.split(".")[-1]: name for name in MODULES if name.startswith("benchmarks.")}


def project_module(name, importer):
    """The project module an import names, or None for a third-party one."""
    if name in MODULES:
        return name
    if importer.startswith("benchmarks.") and name in BARE:
        return BARE[name]
    head = name.split(".")[0]
    return head if head in MODULES else None


PACKAGES_OF = {name for name in MODULES if "." in name}     # modules inside a package: relative imports


def dynamic_import(call):
    """importlib.import_module("x") or __import__("x") with a constant name."""
    f = call.func
    named = (isinstance(f, ast.Attribute) and f.attr == "import_module") or \
        (isinstance(f, ast.Name) and f.id in ("__import__", "import_module"))
    return named and call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str)


def imports(name):
    """[(imported project module, line, inside a function?)] of one module."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                module = child.module or ""
                if child.level:                   # relative: from the importer's package
                    base = name.split(".")[:-child.level] if name in PACKAGES_OF else []
                    module = ".".join(base + ([module] if module else []))
                # `from soka import adapters` names the submodule soka.adapters
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in MODULES else module
                           for a in child.names]
            elif isinstance(child, ast.Call) and dynamic_import(child):
                targets = [child.args[0].value]
            for t in targets:
                m = project_module(t, name)
                package = m.rpartition(".")[0] if m else ""
                if package and package != name and not name.startswith(package + "."):   # its __init__ runs first
                    found.append((package, child.lineno, in_function))
                if m and m != name:
                    found.append((m, child.lineno, in_function))
            visit(child, nested)
    visit(tree, False)
    return found


def tier(name):
    return TIER[name.split(".")[0]]


def edges():
    """{module: {imported modules}}."""
    return {name: {m for m, _, _ in imports(name)} for name in MODULES}


def test_the_tree_is_read():
    assert {"kpsvd", "rank_select", "model", "train", "soka", "soka.adapters", "soka.kron_fused",
            "benchmarks.train_step", "experiments.study"} <= MODULES.keys()
    assert {"kpsvd", "rank_select", "soka.kron_fused", "soka.checkpoints", "soka.files"} == {m for m, _, _ in imports("soka.adapters")}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_import_runs_back(name):
    """Nothing imports a module of a higher tier: soka/ never imports model.py or train.py, model.py
    never train.py, and nothing but benchmarks/ and experiments/ import train.py."""
    back = [(m, line) for m, line, _ in imports(name) if tier(m) > tier(name)]
    assert not back, f"{MODULES[name].name} imports upward: {back}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_deferred_project_import(name):
    late = [(m, line) for m, line, in_function in imports(name) if in_function]
    assert not late, f"{MODULES[name].name} imports project modules inside functions: {late}"


def test_no_circle():
    graph, state, path = edges(), {}, []

    def walk(n):
        state[n] = "open"
        path.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                raise AssertionError("import circle: " + " -> ".join(path[path.index(m):] + [m]))
            if m not in state:
                walk(m)
        path.pop()
        state[n] = "done"
    for n in sorted(graph):
        if n not in state:
            walk(n)


def test_the_checker_catches_a_back_edge_and_a_circle(monkeypatch):
    """The checks above can fail: a soka module importing model, and a two-module circle."""
    fake = {"soka.adapters": "import model\n", "model": "from soka.adapters import inject\n",
            "soka.runs": ("def f():\n    importlib.import_module('train')\n    from . import steps\n"
                          "    from .tasks import load_examples\n    __import__('model')\n")}
    monkeypatch.setattr(Path, "read_text", lambda self, **k: fake.get(module_name(self), ""))
    assert [(m, t) for m, _, t in imports("soka.adapters")] == [("model", False)]
    assert [(m, t) for m, _, t in imports("soka.runs")] == [("train", True), ("soka.steps", True),
                                                            ("soka.tasks", True), ("model", True)]
    with pytest.raises(AssertionError, match="imports upward"):
        test_no_import_runs_back("soka.adapters")
    assert [m for m, _, _ in imports("model")] == ["soka", "soka.adapters"]
    with pytest.raises(AssertionError, match="import circle: .*model -> soka.adapters -> model"):
        test_no_circle()


def test_readme_line_counts_are_the_files():
    """The README's file table quotes each file's length: it must be what `wc -l` says."""
    rows = [line.split("|")[1:3] for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
            if line.startswith("| `")]
    checked = 0
    for names, counts in rows:
        files, folder = [], ""
        for name in (n.strip("`") for n in names.split() if n.startswith("`")):
            name = name.rstrip("`,")
            folder = name.rpartition("/")[0] + "/" if "/" in name else folder
            files.append(name if "/" in name else folder + name)
        numbers = [int(c.replace(",", "")) for c in counts.replace(" ", "").split(",") if c]
        if not numbers:
            continue                                         # a folder row
        assert len(files) == len(numbers), (names, counts)
        for f, n in zip(files, numbers):
            assert len((ROOT / f).read_text(encoding="utf-8").splitlines()) == n, f"README: {f} is not {n} lines"
            checked += 1
    assert checked >= 15
