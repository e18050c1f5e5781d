"""Shared test fixtures. Tests that need ../shared skip cleanly when it is absent."""
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def shared_path(*parts):
    """Path under ../shared, or skip the calling test when it is not there."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not present (../shared is only next to the repo in CI and dev checkouts)")
    return p


@pytest.fixture
def shared():
    return shared_path


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end tests (minutes); run in CI")
    config.addinivalue_line("markers", "detectron2: needs the detectron2 CPU test build")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models: one intra-op thread beats OpenMP spinning on a 2-core (often shared) machine.

    Session-wide, so module-scoped fixtures run with the same thread count as the tests that
    compare against them (float reductions differ between thread counts)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
