"""One `colcon build` of the package per test session, shared by test_package.py and test_ros2_cli.py.

The build sees a copy holding only the package files (as a clone in ``<ws>/src`` would), isolated from user colcon
defaults and from any sourced ROS workspace. :func:`sourced_environment` is the environment after
``. install/setup.bash``, what a user has when they then type ``ros2 ...``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "segmerge_ros"
# What a colcon build needs from the checkout; everything else (.venv, .git, docs, tests) stays out of its view.
PACKAGE_FILES = ["package.xml", "setup.py", "setup.cfg", "resource", PACKAGE, "launch", "config"]

_install_base: dict[str, Path] = {}  # the session's build, made by the first test that needs it


def colcon_executable() -> Path:
    colcon = Path(sys.executable).with_name("colcon")
    if colcon.exists():
        return colcon
    found = shutil.which("colcon")
    if found is None:
        pytest.fail("colcon not found: install requirements-test.txt (colcon-common-extensions)", pytrace=False)
    return Path(found)


def colcon_install(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The install base of this session's `colcon build` (built on the first call)."""
    if "install" in _install_base:
        return _install_base["install"]
    work = tmp_path_factory.mktemp("colcon")
    source = work / "src" / PACKAGE
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in PACKAGE_FILES:
        origin = REPO_ROOT / name
        if origin.is_dir():
            shutil.copytree(origin, source / name, ignore=ignore)
        elif origin.exists():
            source.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, source / name)
    env = {k: v for k, v in os.environ.items() if k not in ("AMENT_PREFIX_PATH", "COLCON_PREFIX_PATH")}
    env["COLCON_HOME"] = str(work / "colcon_home")
    command = [
        str(colcon_executable()), "--log-base", str(work / "log"), "build",
        "--base-paths", str(work / "src"),
        "--build-base", str(work / "build"),
        "--install-base", str(work / "install"),
        "--event-handlers", "console_direct-", "summary-",
    ]
    started = time.monotonic()
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=300,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"colcon build failed:\n{result.stdout}\n{result.stderr}"
    print(f"colcon build: {time.monotonic() - started:.2f} s")
    _install_base["install"] = work / "install"
    return work / "install"


def sourced_environment(install: Path, base: dict[str, str]) -> dict[str, str]:
    """``base`` after ``. <install>/setup.bash`` (colcon's own script: AMENT_PREFIX_PATH, PYTHONPATH, PATH)."""
    result = subprocess.run(["bash", "-c", f'. "{install}/setup.bash" && env -0'], env=base, capture_output=True,
                            check=True, timeout=60, stdin=subprocess.DEVNULL)
    pairs = (entry.split("=", 1) for entry in result.stdout.decode().split("\0") if "=" in entry)
    return {name: value for name, value in pairs if not name.startswith("BASH_FUNC_")}
