"""Layering lint (docs/architecture.md): merging primitives -> models -> merging methods -> runtime -> ros / tools,
ROS only in ros/, and no import cycle among the modules of models/ and merging/.

models/ and merging/ are not two stacked layers: the token-merging primitives of merging/ (bipartite matching,
token groups, the Segformer++ merge configurations) import no model, the models build on them, and the plain-ViT
merging methods of merging/ (ALGM, ClustViT, DoViT and their registry) are models built on models/vit.py.

Every .py under segmerge_ros/ is parsed with ast; imports anywhere in a file count (also lazy ones inside
functions, and importlib.import_module / __import__ with a literal name), relative imports are resolved.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = REPO_ROOT / "segmerge_ros"

# rclpy and the ROS message/interface packages (plus ROS-only helpers) that only segmerge_ros/ros/ may use.
ROS_MODULES = (
    "rclpy", "sensor_msgs", "std_msgs", "rcl_interfaces", "diagnostic_msgs", "visualization_msgs", "vision_msgs",
    "builtin_interfaces", "geometry_msgs", "cv_bridge", "launch", "launch_ros", "rosidl_runtime_py",
)
# The part of merging/ that models/ may use: it imports nothing from models/.
MERGING_PRIMITIVES = ("segmerge_ros.merging.bipartite", "segmerge_ros.merging.token_groups",
                      "segmerge_ros.merging.segformerpp")
# Layer -> internal layers it must not import.
FORBIDDEN_LAYERS = {
    "models": ("runtime", "ros", "tools"),
    "merging": ("runtime", "ros", "tools"),
    "runtime": ("ros", "tools"),
}


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


def test_lint_sees_the_package():
    names = {name for _, name, _ in SOURCES}
    assert {"segmerge_ros", "segmerge_ros.models", "segmerge_ros.runtime", "segmerge_ros.ros"} <= names


def test_import_resolution():
    source = (
        "import rclpy.node\nfrom ..runtime import engine\nfrom . import labels\nfrom segmerge_ros import tools\n"
        "def f():\n    import importlib\n    importlib.import_module('sensor_msgs.msg')\n"
    )
    found = imported_modules(source, "segmerge_ros.models.segformer", is_package=False)
    assert {"rclpy.node", "segmerge_ros.runtime.engine", "segmerge_ros.models.labels", "segmerge_ros.tools",
            "sensor_msgs.msg", "importlib"} <= found
    assert "segmerge_ros.runtime" in imported_modules("from .. import runtime", "segmerge_ros.models", True)


@pytest.mark.parametrize("path,name,imports", SOURCES, ids=[name for _, name, _ in SOURCES])
def test_ros_only_in_ros_layer(path, name, imports):
    if _under(name, "segmerge_ros.ros"):
        return
    bad = sorted(i for i in imports if any(_under(i, ros) for ros in ROS_MODULES))
    assert not bad, f"{path.relative_to(REPO_ROOT)} imports {bad}; only segmerge_ros/ros/ may use ROS"


@pytest.mark.parametrize("path,name,imports", SOURCES, ids=[name for _, name, _ in SOURCES])
def test_layers_import_only_lower_layers(path, name, imports):
    for layer, forbidden in FORBIDDEN_LAYERS.items():
        if _under(name, f"segmerge_ros.{layer}"):
            bad = sorted(i for i in imports for f in forbidden if _under(i, f"segmerge_ros.{f}"))
            assert not bad, f"{path.relative_to(REPO_ROOT)} ({layer}) imports {bad}"


def _is_primitive(name: str) -> bool:
    return any(_under(name, primitive) for primitive in MERGING_PRIMITIVES)


@pytest.mark.parametrize("path,name,imports", SOURCES, ids=[name for _, name, _ in SOURCES])
def test_merging_primitives_import_no_model_and_models_only_primitives(path, name, imports):
    if _is_primitive(name):
        bad = sorted(i for i in imports if _under(i, "segmerge_ros.models"))
        assert not bad, f"{path.relative_to(REPO_ROOT)} is a merging primitive but imports models: {bad}"
    if _under(name, "segmerge_ros.models"):
        bad = sorted(i for i in imports if _under(i, "segmerge_ros.merging") and not _is_primitive(i)
                     and i != "segmerge_ros.merging")
        assert not bad, f"{path.relative_to(REPO_ROOT)} imports merging methods {bad}; models may use only " \
                        f"{MERGING_PRIMITIVES}"


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


def test_no_import_cycle_between_models_and_merging_modules():
    inner = ("segmerge_ros.models", "segmerge_ros.merging")
    graph = {name: {i for i in imports if i.startswith(inner)}
             for name, imports in import_graph().items() if name.startswith(inner)}
    assert "segmerge_ros.merging.segformerpp" in graph["segmerge_ros.models.segformer"]  # the graph sees imports
    assert "segmerge_ros.models.vit" in graph["segmerge_ros.merging.algm"]
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)
