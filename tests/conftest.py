"""Shared fixtures: a random SD1.x-shaped checkpoint on disk (the path SD v1.4 takes) and the
real memorizing testbed (built once into the cache, then reused; slow tier only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from factories import build_sd_shaped

torch.set_num_threads(2)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def sd_shaped_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sd_shaped")
    return build_sd_shaped(root / "model", root / "tok")


@pytest.fixture(scope="session")
def testbed_dir() -> Path:
    """The real testbed (cached under MEMTRAIN_CACHE; ~13 min to build once on 2 cores)."""
    from memtrain.testbed.resolver import cached_testbed

    return cached_testbed(seed=0, progress=False)


def pytest_collection_modifyitems(config, items):
    """Tests on the real testbed are the slow tier (the first one builds it, ~15 min on 2 cores)."""
    for item in items:
        if "testbed_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
