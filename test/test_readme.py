"""The README's interface tables match the code: every node parameter and every segmerge-bench option is documented."""

from __future__ import annotations

import re

from conftest import REPO_ROOT

from segmerge_ros.ros.params import PARAMETERS
from segmerge_ros.bench import bench

README = (REPO_ROOT / "README.md").read_text()


def test_every_parameter_is_in_the_readme_table():
    rows = set(re.findall(r"^\| `([a-z_.]+)` \|", README, flags=re.MULTILINE))
    assert {spec.name for spec in PARAMETERS} <= rows


def test_every_bench_option_is_documented():
    parser_options = re.findall(r'add_argument\(\s*"(--[a-z-]+)"', (REPO_ROOT / "segmerge_ros/bench/bench.py").read_text())
    assert parser_options and bench.main
    for option in parser_options:
        assert f"`{option}" in README, option


def test_both_commands_are_given():
    assert "make demo" in README and "make test" in README
    assert "make test" in (REPO_ROOT / ".ci" / "run").read_text()
