"""The package's import graph: every module imports, imports point one way (no cycle, counting the
imports inside functions, which is where cycles used to hide), and the package's own modules are
imported inside a function only for the reasons listed in LAZY."""

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

from conftest import REPO

# (importer, imported) -> why the import waits until a function runs.
LAZY = {
    ("nag_lightning", "nag_lightning.data"): "the package root: `import nag_lightning` never pulls in Lightning",
    ("nag_lightning", "nag_lightning.lightning.lit_module"): "the package root: `import nag_lightning` never pulls in Lightning",
    ("nag_lightning.commands.main", "nag_lightning.lightning.cli"): "`nag --help` answers without importing Lightning",
    ("nag_lightning.interop.export", "nag_lightning.interop.hf"): "imports transformers, an optional extra",
    ("nag_lightning.interop.export", "nag_lightning.interop.modeling_nag"): "imports transformers, an optional extra",
    ("nag_lightning.interop.evaluation", "nag_lightning.interop.hf"): "imports transformers, an optional extra",
    ("nag_lightning.commands.kernel_bench", "nag_lightning.kernels.nag_update"): "its Triton kernel needs triton, optional",
}
NEEDS = {"nag_lightning.interop.modeling_nag": "transformers", "nag_lightning.interop.hf": "transformers"}


def package_modules() -> dict[str, Path]:
    """Module name -> source file, for the package and its kernels (installed as nag_lightning.kernels)."""
    modules = {}
    for folder, package in ((REPO / "nag_lightning", "nag_lightning"), (REPO / "kernels", "nag_lightning.kernels")):
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_graph(modules: dict[str, Path]) -> dict[str, dict[str, bool]]:
    """importer -> {imported module: whether every import of it is inside a function}."""
    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        in_functions = {id(node) for function in ast.walk(tree) if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
                        for node in ast.walk(function) if isinstance(node, (ast.Import, ast.ImportFrom))}
        edges = graph[module] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                # `from package import submodule` depends on the submodule, not on the package's __init__
                names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                         for alias in node.names]
            else:
                continue
            for target in filter(None, map(owner, names)):
                if target != module:
                    edges[target] = edges.get(target, True) and id(node) in in_functions
    return graph


def cycles(graph: dict[str, dict[str, bool]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_every_module_imports():
    for module in sorted(package_modules()):
        if module in NEEDS and importlib.util.find_spec(NEEDS[module]) is None:
            continue
        importlib.import_module(module)


def test_imports_point_one_way():
    assert cycles(import_graph(package_modules())) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b": False}, "b": {"c": True}, "c": {"a": False}, "d": {"a": False}}) == [["a", "b", "c"]]


def test_the_package_imports_its_own_modules_inside_functions_only_for_listed_reasons():
    lazy = {(importer, imported) for importer, edges in import_graph(package_modules()).items()
            for imported, only_in_functions in edges.items() if only_in_functions}
    assert lazy == set(LAZY), "update LAZY (with the reason) or import at the top of the module"


@pytest.mark.parametrize("module", ["nag_lightning", "nag_lightning.model"])
def test_the_model_does_not_pull_in_lightning(module):
    import subprocess
    import sys

    code = f"import sys, {module}; print(any(name.startswith('lightning') for name in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO / "tests")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def declared_distributions() -> set[str]:
    """Every distribution pyproject.toml names: dependencies and each optional extra."""
    import re
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_every_distribution_the_package_imports_is_declared():
    """An import that only works because another package brought its distribution along fails here
    (the wheel test installs with the host's packages, so it cannot see that)."""
    import sys
    from importlib.metadata import packages_distributions

    distributions = packages_distributions()
    imported = set()
    for path in package_modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"nag_lightning", "__future__"}
    undeclared = {name: distributions.get(name) for name in third_party
                  if not {d.lower().replace("_", "-") for d in distributions.get(name, [name])} & declared_distributions()}
    assert undeclared == {}


def test_moved_modules_keep_their_old_names():
    """Class paths in configs and saved run folders, and scripts, name modules by where they were."""
    import nag_lightning

    for old, new in nag_lightning.MOVED_MODULES.items():
        assert importlib.import_module(old) is importlib.import_module(new)
    from nag_lightning.callbacks import SkipRateController
    from nag_lightning.dashboard import TensorBoardLogger
    from nag_lightning.lightning.callbacks import SkipRateController as moved_controller
    from nag_lightning.lightning.dashboard import TensorBoardLogger as moved_logger

    assert (SkipRateController, TensorBoardLogger) == (moved_controller, moved_logger)
    # Every class path of a run folder saved in the old layout (a study cell's config.yaml from
    # before the move, kept verbatim) still resolves.
    saved = (REPO / "tests/data/run_config_old_layout.yaml").read_text()
    class_paths = [line.split("class_path:")[1].strip() for line in saved.splitlines() if "class_path: nag_lightning" in line]
    assert "nag_lightning.callbacks.SkipRateController" in class_paths
    for class_path in class_paths:
        module, _, name = class_path.rpartition(".")
        assert isinstance(getattr(importlib.import_module(module), name), type), class_path
