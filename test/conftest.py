"""Shared fixtures. Tests that need ../shared/data fail loudly when it is missing (never skip silently)."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# Two test runs at once on one machine (a developer's beside CI, two checkouts) must not share a DDS domain, or one
# run's parameter sets and topics reach the other's nodes: each run draws its own offset (its pid), and every test's
# domain derives from its name plus that offset.
RUN_DOMAIN_OFFSET = int(os.environ.get("SEGMERGE_TEST_DOMAIN_OFFSET", os.getpid()))


def ros_domain_id(name: str, first: int = 100, count: int = 100) -> int:
    """A ROS_DOMAIN_ID in [first, first + count) for the test or module called ``name``, private to this run."""
    return first + (zlib.crc32(name.encode()) + RUN_DOMAIN_OFFSET) % count


def shared_data_dir() -> Path:
    """../shared/data beside the checkout, or $SEGMERGE_SHARED_DATA."""
    return Path(os.environ.get("SEGMERGE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.fail(f"shared test data not found at {path}; set SEGMERGE_SHARED_DATA", pytrace=False)
    return path


@pytest.fixture(scope="session")
def student_dir(shared_data: Path) -> Path:
    """The SegFormer-B0 trained here (hub layout) with its held-out frames."""
    path = shared_data / "segformer_b0_vtest_student"
    if not (path / "model.safetensors").is_file():
        pytest.fail(f"trained SegFormer-B0 not found at {path}", pytrace=False)
    return path


@pytest.fixture
def one_thread():
    """Tiny models: one thread is fastest, and on a shared 2-core machine spinning OpenMP threads stall."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread_module():
    """``one_thread`` for a module's fixtures (tools run in this process set torch's threads themselves)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
