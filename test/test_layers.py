"""Layering lint (docs/architecture.md): one layer per folder, every import pointing down, no import cycle.

| folder | may import (inside the package) |
|---|---|
| merging/ | nothing (torch only) |
| models/ | merging |
| inference/ | models, merging |
| ros/ | inference, models, merging |
| apps/ | ros, inference, models, merging |
| training/ | inference, models, merging |
| bench/ | apps, ros, training, inference, models, merging |

rclpy and the ROS message packages only in ros/, apps/ and bench/. Every .py under segmerge_ros/ is parsed with
ast; imports anywhere in a file count (also lazy ones inside functions, and importlib.import_module / __import__
with a literal name), relative imports are resolved.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = REPO_ROOT / "segmerge_ros"

# rclpy, the ROS message/interface packages and the bag libraries: only the ROS-facing layers use them.
ROS_MODULES = (
    "rclpy", "sensor_msgs", "std_msgs", "rcl_interfaces", "diagnostic_msgs", "visualization_msgs", "vision_msgs",
    "hri_msgs", "builtin_interfaces", "geometry_msgs", "lifecycle_msgs", "cv_bridge", "launch", "launch_ros",
    "rosidl_runtime_py", "rosbags", "mcap",
)
ROS_LAYERS = ("ros", "apps", "bench")
# Layer -> the layers it may import besides itself (the table above).
ALLOWED_LAYERS = {
    "merging": (),
    "models": ("merging",),
    "inference": ("models", "merging"),
    "ros": ("inference", "models", "merging"),
    "apps": ("ros", "inference", "models", "merging"),
    "training": ("inference", "models", "merging"),
    "bench": ("apps", "ros", "training", "inference", "models", "merging"),
}
MAX_LINES = 600


def module_name(path: Path) -> str:
    """Dotted module name of a file under the repo root (a package's __init__ names the package)."""
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool) -> set[str]:
    """Every absolute module name the source imports, or may import via ``from X import name``."""
    found: set[str] = set()
    package_parts = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # `from segmerge_ros import runtime` imports the submodule segmerge_ros.runtime.
            found.update(f"{target}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.add(node.args[0].value)
    return {name for name in found if name}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _sources() -> list[tuple[Path, str, set[str]]]:
    sources = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        name = module_name(path)
        imports = imported_modules(path.read_text(encoding="utf-8"), name, path.name == "__init__.py")
        sources.append((path, name, imports))
    return sources


SOURCES = _sources()


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "segmerge_ros" else None


def test_lint_sees_every_layer_and_no_stray_folder():
    layers = {layer_of(name) for _, name, _ in SOURCES} - {None}
    assert layers == set(ALLOWED_LAYERS), f"folders {sorted(layers)} vs the table {sorted(ALLOWED_LAYERS)}"


def test_import_resolution():
    source = (
        "import rclpy.node\nfrom ..inference import engine\nfrom . import labels\nfrom segmerge_ros import bench\n"
        "def f():\n    import importlib\n    importlib.import_module('sensor_msgs.msg')\n"
    )
    found = imported_modules(source, "segmerge_ros.models.labels", is_package=False)
    assert {"rclpy.node", "segmerge_ros.inference.engine", "segmerge_ros.models.labels", "segmerge_ros.bench",
            "sensor_msgs.msg", "importlib"} <= found
    assert "segmerge_ros.inference" in imported_modules("from .. import inference", "segmerge_ros.models", True)


@pytest.mark.parametrize("path,name,imports", SOURCES, ids=[name for _, name, _ in SOURCES])
def test_ros_only_in_ros_facing_layers(path, name, imports):
    if layer_of(name) in ROS_LAYERS:
        return
    bad = sorted(i for i in imports if any(_under(i, ros) for ros in ROS_MODULES))
    assert not bad, f"{path.relative_to(REPO_ROOT)} imports {bad}; only {ROS_LAYERS} may use ROS"


def layer_violations(name: str, imports: set[str]) -> list[str]:
    """The package imports of module ``name`` that its layer may not make."""
    layer = layer_of(name)
    if layer is None:  # segmerge_ros/__init__.py
        return sorted(i for i in imports if layer_of(i) is not None)
    allowed = (layer,) + ALLOWED_LAYERS[layer]
    return sorted(i for i in imports if _under(i, "segmerge_ros") and i != "segmerge_ros" and layer_of(i) not in allowed)


def test_layer_rule_catches_an_upward_import():
    assert layer_violations("segmerge_ros.models.labels", {"segmerge_ros.inference.engine"}) == \
        ["segmerge_ros.inference.engine"]
    assert layer_violations("segmerge_ros.inference.engine", {"segmerge_ros.ros.node"}) == ["segmerge_ros.ros.node"]
    assert layer_violations("segmerge_ros.training.train", {"segmerge_ros.bench.bench"}) == ["segmerge_ros.bench.bench"]
    assert layer_violations("segmerge_ros.merging.bipartite", {"segmerge_ros.models.vit.segmenter"})
    assert not layer_violations("segmerge_ros.bench.bench", {"segmerge_ros.training.train", "segmerge_ros.apps.bag"})


@pytest.mark.parametrize("path,name,imports", SOURCES, ids=[name for _, name, _ in SOURCES])
def test_every_import_points_down(path, name, imports):
    bad = layer_violations(name, imports)
    assert not bad, f"{path.relative_to(REPO_ROOT)} ({layer_of(name)}) imports {bad}"


@pytest.mark.parametrize("path,name,imports", SOURCES, ids=[name for _, name, _ in SOURCES])
def test_module_is_small_and_says_its_job(path, name, imports):
    text = path.read_text(encoding="utf-8")
    lines = text.count("\n")
    assert lines <= MAX_LINES, f"{path.relative_to(REPO_ROOT)} has {lines} lines (at most {MAX_LINES})"
    doc = ast.get_docstring(ast.parse(text))
    assert doc and doc.strip(), f"{path.relative_to(REPO_ROOT)} has no docstring saying its job"


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (``from X import name`` resolved to the module X or X.name)."""
    modules = {name for _, name, _ in SOURCES}
    graph = {}
    for _, name, imports in SOURCES:
        graph[name] = {i for i in imports if i in modules and i != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_anywhere_in_the_package():
    graph = import_graph()
    assert "segmerge_ros.merging.segformerpp" in graph["segmerge_ros.models.segformer.model"]  # the graph sees imports
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)
