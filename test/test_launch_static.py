"""The launch file, params YAML and RViz layout, checked without `launch` (test_ros2_cli.py runs them for real).

The launch file is read as a Python syntax tree; the YAML is compared with the node's parameter table, and also
handed to rcl's own parser through a real rclpy node, so types and the node-name key are what rcl reads.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import rclpy
import yaml
from rclpy.context import Context
from rclpy.node import Node
from rclpy.parameter import Parameter

from conftest import ros_domain_id
from segmerge_ros.ros.params import DEFAULTS, PARAMETERS

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch" / "segmerge.launch.py"
CONFIG = ROOT / "config" / "segmerge.yaml"
RVIZ = ROOT / "config" / "segmerge.rviz"


@pytest.fixture(scope="module")
def launch_tree() -> ast.Module:
    return ast.parse(LAUNCH.read_text(), filename=str(LAUNCH))


def calls(tree: ast.AST, name: str) -> list[ast.Call]:
    def called(node: ast.Call) -> str:
        func = node.func
        return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""

    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and called(n) == name]


def keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def constant(node, module: ast.Module):
    """A literal, or the value of a module-level NAME = "literal"."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        for statement in module.body:
            if isinstance(statement, ast.Assign) and any(isinstance(t, ast.Name) and t.id == node.id
                                                         for t in statement.targets):
                return constant(statement.value, module)
    return None


def test_launch_declares_its_arguments(launch_tree):
    declared = {constant(c.args[0], launch_tree) for c in calls(launch_tree, "DeclareLaunchArgument")}
    assert declared == {"image_topics", "weights", "params_file", "namespace", "use_rviz", "autostart", "hri"}
    assert any(isinstance(n, ast.FunctionDef) and n.name == "generate_launch_description" for n in launch_tree.body)


def test_launch_starts_the_installed_segmerge_node(launch_tree):
    nodes = calls(launch_tree, "Node")
    segmerge = [n for n in nodes if constant(keyword(n, "executable"), launch_tree) == "segmerge_node"]
    assert len(segmerge) == 1
    assert constant(keyword(segmerge[0], "package"), launch_tree) == "segmerge_ros"
    assert constant(keyword(segmerge[0], "name"), launch_tree) == "segmerge"
    rviz = [n for n in nodes if constant(keyword(n, "executable"), launch_tree) == "rviz2"]
    assert len(rviz) == 1 and keyword(rviz[0], "condition") is not None


def test_launch_defaults_to_the_installed_config(launch_tree):
    share = calls(launch_tree, "get_package_share_directory")
    assert share and all(constant(c.args[0], launch_tree) == "segmerge_ros" for c in share)
    joined = [[constant(a, launch_tree) for a in c.args[1:]] for c in calls(launch_tree, "join")]
    assert ["config", "segmerge.yaml"] in joined
    assert ["config", "segmerge.rviz"] in joined
    params_default = next(c for c in calls(launch_tree, "DeclareLaunchArgument")
                          if constant(c.args[0], launch_tree) == "params_file")
    assert isinstance(keyword(params_default, "default_value"), ast.Name)  # the installed path, not a literal


def launch_function(name: str):
    """A plain function of the launch file (with its module constants), run without `launch` installed."""
    module = ast.parse(LAUNCH.read_text())
    constants = [n for n in module.body if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant)]
    function = next(n for n in module.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace: dict = {}
    exec(compile(ast.Module(body=[*constants, function], type_ignores=[]), str(LAUNCH), "exec"), namespace)
    return namespace[name]


def test_launch_topic_argument_parsing():
    parse = launch_function("parse_topics")
    assert parse("") == []
    assert parse("/camera/image_raw") == ["/camera/image_raw"]
    assert parse("[/left/image, '/right/image/compressed']") == ["/left/image", "/right/image/compressed"]
    assert parse("a,b") == ["a", "b"]


def test_launch_keeps_the_users_fast_dds_profile_else_gives_the_packaged_one(launch_tree):
    choose = launch_function("fastdds_profile")
    packaged = "/ws/install/segmerge_ros/share/segmerge_ros/config/fastdds.xml"
    assert choose({}, packaged) == (packaged, False)
    assert choose({"FASTRTPS_DEFAULT_PROFILES_FILE": ""}, packaged) == (packaged, False)
    assert choose({"FASTRTPS_DEFAULT_PROFILES_FILE": "/etc/my_dds.xml"}, packaged) == ("/etc/my_dds.xml", True)
    joined = [[constant(a, launch_tree) for a in c.args[1:]] for c in calls(launch_tree, "join")]
    assert ["config", "fastdds.xml"] in joined and (ROOT / "config" / "fastdds.xml").is_file()
    # Given to our node and RViz as their own environment, never set on the launch context: a launch file that
    # includes this one must not hand the profile to its own processes started after it.
    assert not calls(launch_tree, "SetEnvironmentVariable")
    for node in calls(launch_tree, "Node"):
        assert isinstance(keyword(node, "additional_env"), ast.Name), constant(keyword(node, "executable"), launch_tree)


def test_config_has_every_parameter_with_the_table_default():
    document = yaml.safe_load(CONFIG.read_text())
    assert list(document) == ["/**/segmerge"]
    values = document["/**/segmerge"]["ros__parameters"]
    assert set(values) == set(DEFAULTS)
    for name, default in DEFAULTS.items():
        assert values[name] == default and type(values[name]) is type(default), name


def test_config_documents_every_parameter():
    lines = CONFIG.read_text().splitlines()
    for spec in PARAMETERS:
        index = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{spec.name}:"))
        assert lines[index - 1].strip().startswith("#"), f"{spec.name} has no comment line above it"


def test_rcl_reads_the_config_as_the_node_declares_it():
    """rcl's YAML parser, the node-name key and the value types, through a real rclpy node named segmerge."""
    context = Context()
    rclpy.init(context=context, domain_id=ros_domain_id("test_launch_static"),
               args=["--ros-args", "--params-file", str(CONFIG)])
    try:
        node = Node("segmerge", context=context, automatically_declare_parameters_from_overrides=True)
        read = {name: node.get_parameter(name) for name in DEFAULTS}
        for spec in PARAMETERS:
            expected = Parameter.Type.from_parameter_value(spec.default)
            assert read[spec.name].type_ == expected, spec.name
            assert read[spec.name].value == spec.default, spec.name
        node.destroy_node()
    finally:
        rclpy.try_shutdown(context=context)


def test_rviz_layout_shows_camera_overlay_and_mask_best_effort():
    layout = yaml.safe_load(RVIZ.read_text())
    images = [d for d in layout["Visualization Manager"]["Displays"] if d["Class"] == "rviz_default_plugins/Image"]
    assert {d["Topic"]["Value"] for d in images} == {"image", "segmentation/overlay", "segmentation/mask"}
    assert all(d["Topic"]["Reliability Policy"] == "Best Effort" for d in images)
