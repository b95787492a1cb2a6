"""The import graph of the package: its layers import only downwards, no cycles, and no
plugin importing its own package's `__init__` (which imports every plugin: the registries
live in leaf modules)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "oscbench"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_imports(deferred: bool = False) -> dict[str, set[str]]:
    """Each module's imports of oscbench modules at module level, and with `deferred` those
    inside functions too (deferred on purpose, for start-up: they cannot close a cycle, but
    they must respect the layers). A package whose `__init__` calls `import_plugins` imports
    every module in it."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        found: set[str] = set()
        for node in ast.walk(tree) if deferred else tree.body:
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.Expr) and "import_plugins" in ast.unparse(node):
                found |= {m for m in modules if m.rpartition(".")[0] == name}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


FOUNDATION = {"oscbench", "oscbench.registry", "oscbench.distributed"}  # open to every layer
COMMANDS = {f"oscbench.{c}" for c in ("run", "report", "claims", "export", "toy")}
PLUGINS = ("quant", "oscillation", "models", "data")
# each layer and the layers below it, which it may import (and itself, and the foundation)
BELOW = {
    "records": set(),
    "plugins": {"records"},
    "training": {"records", "plugins"},
    "deploy": {"records", "plugins"},
    "launch": {"records", "plugins", "training", "deploy"},
    "analysis": {"records", "plugins", "launch"},
    "commands": {"records", "plugins", "training", "deploy", "launch", "analysis"},
}


def layer(module: str) -> str:
    if module in FOUNDATION:
        return "foundation"
    if module in COMMANDS:
        return "commands"
    room = module.split(".")[1]
    return "plugins" if room in PLUGINS else room


def upward(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a module from a layer its own may not import."""
    return sorted(
        f"{name} ({layer(name)}) imports {dep} ({layer(dep)})"
        for name, deps in graph.items()
        for dep in deps
        if layer(dep) not in {layer(name), "foundation", *BELOW.get(layer(name), ())}
    )


def test_every_module_is_in_a_layer_and_imports_only_downwards():
    """records <- plugins <- training <- launch <- commands; deploy (the integer model) over
    the plugins, under launch; analysis over records and launch's composition: a module
    imports its own layer, the layers below it and the foundation, also inside functions;
    nothing imports a command."""
    graph = module_imports(deferred=True)
    assert {layer(m) for m in graph} == {"foundation", *BELOW}
    assert upward(graph) == []


def test_the_layer_check_can_fail():
    """An upward import, as a fault introduced once: a record that imports the loop."""
    graph = module_imports(deferred=True)
    graph["oscbench.records.runs"] = graph["oscbench.records.runs"] | {"oscbench.training.loop"}
    graph["oscbench.quant.lsq"] = graph["oscbench.quant.lsq"] | {"oscbench.run"}
    assert upward(graph) == [
        "oscbench.quant.lsq (plugins) imports oscbench.run (commands)",
        "oscbench.records.runs (records) imports oscbench.training.loop (training)",
    ]


def test_no_module_imports_itself_in_a_cycle():
    graph = module_imports()
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            pytest.fail("import cycle: " + " -> ".join([*path[path.index(name) :], name]))
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_no_plugin_imports_its_own_package():
    graph = module_imports()
    upward = [
        (name, dep)
        for name, deps in graph.items()
        for dep in deps
        if name.startswith(dep + ".") and dep != "oscbench"
    ]
    assert not upward, f"modules that import their own package's __init__: {upward}"


def test_the_check_can_fail():
    """The graph sees what it must: the packages import their plugins."""
    graph = module_imports()
    assert "oscbench.quant.lsq" in graph["oscbench.quant"]
    assert "oscbench.quant.base" in graph["oscbench.quant.lsq"]


HEAVY = ("timm", "torchvision", "sklearn", "optuna", "wandb", "scipy", "pandas", "matplotlib")


def test_start_up_imports_none_of_the_heavy_libraries():
    """`import oscbench.run` and Hydra's plugin scan (what `python -m oscbench.run bits=9`
    does before it rejects the value) load none of the libraries that take seconds to
    import: each is imported where it is used (bench/startup.md times it)."""
    import json
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "import oscbench.run\n"
        "from hydra.core.plugins import Plugins\n"
        "from hydra.plugins.launcher import Launcher\n"
        "from hydra.plugins.sweeper import Sweeper\n"
        "Plugins.instance().discover(Sweeper); Plugins.instance().discover(Launcher)\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == []
