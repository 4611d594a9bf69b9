"""package.xml declares exactly the ROS packages and system Python libraries the code imports (issue 10: cv_bridge
was declared and never used). pip-only libraries (torch, safetensors, ...) have no rosdep key and stay out."""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# Imports that rosdep resolves to system packages, by their key.
SYSTEM_PYTHON_KEYS = {"numpy": "python3-numpy", "cv2": "python3-opencv", "numba": "python3-numba"}
ROS_IMPORT = re.compile(r"^(rclpy|launch|launch_ros|ament_index_python|cv_bridge|rosidl_\w+|\w+_msgs|\w+_interfaces)$")


def top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def used_keys() -> set[str]:
    files = [p for p in (REPO_ROOT / "segmerge_ros").rglob("*.py") if "__pycache__" not in p.parts]
    files += sorted((REPO_ROOT / "launch").glob("*.py"))
    imports = set().union(*(top_level_imports(p) for p in files))
    return {name for name in imports if ROS_IMPORT.match(name)} | \
        {key for name, key in SYSTEM_PYTHON_KEYS.items() if name in imports}


def test_the_import_scan_sees_ros_and_system_imports():
    keys = used_keys()
    assert {"rclpy", "sensor_msgs", "launch_ros", "python3-numpy", "python3-opencv"} <= keys
    assert "torch" not in keys


def test_exec_depends_are_exactly_what_the_code_imports():
    root = ET.parse(REPO_ROOT / "package.xml").getroot()
    declared = {e.text.strip() for e in root.iter("exec_depend")}
    used = used_keys()
    assert declared - used == set(), f"declared but never imported: {sorted(declared - used)}"
    assert used - declared == set(), f"imported but not declared: {sorted(used - declared)}"


def test_test_depends_are_used_by_the_tests():
    root = ET.parse(REPO_ROOT / "package.xml").getroot()
    declared = {e.text.strip() for e in root.iter("test_depend")}
    tests = set().union(*(top_level_imports(p) for p in (REPO_ROOT / "test").glob("*.py")))
    python_keys = {f"python3-{name}" for name in tests}
    unused = {d for d in declared if d not in python_keys and d not in tests}
    assert not unused, f"test_depend never used by the tests: {sorted(unused)}"
