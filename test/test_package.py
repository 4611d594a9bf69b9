"""Packaging: package.xml, setup.py/setup.cfg, and the layout `colcon build` installs (what `ros2 run` relies on)."""

from __future__ import annotations

import configparser
import os
import runpy
import stat
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import setuptools

import segmerge_ros

import colcon_workspace  # test/ helper: the session's one colcon build

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "segmerge_ros"

CONSOLE_SCRIPTS = {
    "segmerge_node": "segmerge_ros.ros.node:main",
    "segmerge_camera": "segmerge_ros.apps.camera_node:main",
    "segmerge-bench": "segmerge_ros.bench.bench:main",
    "segmerge-demo": "segmerge_ros.apps.offline_demo:main",
    "segmerge-train": "segmerge_ros.training.cli:main",
    "segmerge-build-engines": "segmerge_ros.apps.build_engines:main",
    "segmerge-bag": "segmerge_ros.apps.bag:main",
}


def _text(root: ET.Element, tag: str) -> str:
    node = root.find(tag)
    assert node is not None and node.text, f"package.xml has no <{tag}>"
    return node.text.strip()


def _installable_files(folder: str) -> set[str]:
    """Names of the regular files in a repo folder (caches and dotfiles are not meant to be installed)."""
    path = REPO_ROOT / folder
    if not path.is_dir():
        return set()
    return {p.name for p in path.iterdir() if p.is_file() and not p.name.startswith(".")}


@pytest.fixture(scope="module")
def setup_kwargs() -> dict:
    """The keyword arguments setup.py passes to setuptools.setup(), captured without building anything."""
    captured: dict = {}
    original_setup, original_cwd = setuptools.setup, os.getcwd()
    setuptools.setup = lambda **kwargs: captured.update(kwargs)
    try:
        os.chdir(REPO_ROOT)  # setup.py's globs are relative to the package root, as under colcon and pip
        runpy.run_path(str(REPO_ROOT / "setup.py"), run_name="__main__")
    finally:
        setuptools.setup = original_setup
        os.chdir(original_cwd)
    assert captured, "setup.py did not call setuptools.setup()"
    return captured


def test_package_xml_is_format_3_ament_python():
    # Which dependencies it declares: test_package_deps.py (exactly what the code imports).
    root = ET.parse(REPO_ROOT / "package.xml").getroot()
    assert root.tag == "package" and root.get("format") == "3"
    assert _text(root, "name") == PACKAGE
    assert _text(root, "version") == segmerge_ros.__version__ == "0.1.0"
    assert _text(root, "license") == "Apache-2.0"
    assert _text(root, "export/build_type") == "ament_python"
    # torch is pip-only (no rosdep key), so it must not appear as a ROS dependency.
    all_depends = {e.text.strip() for e in root.iter() if e.tag.endswith("depend") and e.text}
    assert not {d for d in all_depends if "torch" in d}


def test_package_xml_passes_catkin_pkg_validation():
    from catkin_pkg.package import parse_package  # pinned in requirements-test.txt (colcon's parser)

    package = parse_package(str(REPO_ROOT / "package.xml"))  # raises on format violations
    package.validate()
    assert package.package_format == 3 and package.name == PACKAGE


def test_setup_py_metadata_and_entry_points(setup_kwargs):
    assert setup_kwargs["name"] == PACKAGE
    assert setup_kwargs["version"] == segmerge_ros.__version__
    scripts = dict(
        (name.strip(), target.strip())
        for name, target in (line.split("=", 1) for line in setup_kwargs["entry_points"]["console_scripts"])
    )
    assert scripts == CONSOLE_SCRIPTS
    packages = setup_kwargs["packages"]
    assert PACKAGE in packages and f"{PACKAGE}.models" in packages
    assert not any(p == "test" or p.startswith("test.") for p in packages)
    assert set(setup_kwargs["install_requires"]) >= {"numpy", "opencv-python-headless", "safetensors", "torch"}


def test_setup_py_data_files_use_globs_over_launch_and_config(setup_kwargs):
    data_files = {dest: set(files) for dest, files in setup_kwargs["data_files"]}
    assert data_files["share/ament_index/resource_index/packages"] == {f"resource/{PACKAGE}"}
    assert data_files[f"share/{PACKAGE}"] == {"package.xml"}
    launch = {f"launch/{p.name}" for p in (REPO_ROOT / "launch").glob("*.launch.py")}
    config = {f"config/{p.name}" for p in REPO_ROOT.glob("config/*") if p.suffix in (".yaml", ".rviz", ".xml")}
    assert data_files[f"share/{PACKAGE}/launch"] == launch
    assert data_files[f"share/{PACKAGE}/config"] == config
    assert (REPO_ROOT / "resource" / PACKAGE).is_file()


def test_setup_cfg_puts_scripts_where_ros2_run_looks():
    config = configparser.ConfigParser(interpolation=None)
    config.read(REPO_ROOT / "setup.cfg")
    assert config["develop"]["script_dir"] == f"$base/lib/{PACKAGE}"
    assert config["install"]["install_scripts"] == f"$base/lib/{PACKAGE}"


@pytest.fixture(scope="module")
def colcon_install(tmp_path_factory) -> Path:
    """The install base of the session's `colcon build` of a copy holding only the package files."""
    return colcon_workspace.colcon_install(tmp_path_factory)


def test_colcon_install_layout(colcon_install):
    prefix = colcon_install / PACKAGE
    node = prefix / "lib" / PACKAGE / "segmerge_node"
    assert node.is_file() and node.stat().st_mode & stat.S_IXUSR, f"{node} missing or not executable"
    installed_scripts = {p.name for p in (prefix / "lib" / PACKAGE).iterdir()}
    assert installed_scripts == set(CONSOLE_SCRIPTS)
    assert (prefix / "share" / PACKAGE / "package.xml").read_bytes() == (REPO_ROOT / "package.xml").read_bytes()
    assert (prefix / "share" / "ament_index" / "resource_index" / "packages" / PACKAGE).is_file()
    site_packages = list(prefix.glob(f"lib/python3*/site-packages/{PACKAGE}"))
    assert len(site_packages) == 1 and (site_packages[0] / "models" / "labels.py").is_file()


@pytest.mark.parametrize("folder", ["launch", "config"])
def test_colcon_installs_every_launch_and_config_file(colcon_install, folder):
    # Every file there must be installed: one a glob in setup.py misses would be absent after `colcon build`.
    installed_dir = colcon_install / PACKAGE / "share" / PACKAGE / folder
    installed = {p.name for p in installed_dir.iterdir()} if installed_dir.is_dir() else set()
    assert installed == _installable_files(folder)
    for name in installed:
        assert (installed_dir / name).read_bytes() == (REPO_ROOT / folder / name).read_bytes()
