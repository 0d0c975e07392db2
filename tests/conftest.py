"""Shared fixtures: a random SD1.x-shaped checkpoint on disk (the path SD v1.4 takes) and the
real memorizing testbed (built once into the cache, then reused; slow tier only)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from factories import build_sd_shaped
from memtrain.core.tokenizer import build_clip_tokenizer
from memtrain.core.manifest import read_manifest, write_manifest

# Two threads on the 2-core machines; one per worker when pytest-xdist runs two workers (the fast
# tier: `-n 2`), which keeps tiny-model tests from fighting over the cores.
# The commands the tests start inherit one thread too: two busy-waiting OpenMP pools on two cores
# made steps up to 10x slower here. Two-process launches in the tests pick a free port
# (`--main_process_port 0`) since two workers may start one at the same time.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def sd_shaped_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sd_shaped")
    return build_sd_shaped(root / "model", root / "tok")


@pytest.fixture(scope="session")
def testbed_dir() -> Path:
    """The real testbed (cached under MEMTRAIN_CACHE; about 10 min to build once on 2 cores)."""
    from memtrain.testbed.resolver import cached_testbed

    return cached_testbed(seed=0, progress=False)


def pytest_collection_modifyitems(config, items):
    """Tests on the real testbed are the slow tier. The README's test command builds the testbed
    (2 threads, about 10 min) before the slow tier's workers start; without it the first test
    builds it under a lock, on its worker's one thread (much slower, and other weights: the
    build's float sums depend on the thread count)."""
    for item in items:
        if "testbed_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.testbed)


# The slow tier's longest tests (minutes each on one thread), in the order they are handed out.
# pytest-xdist's `load` scheduling gives each of the two workers a first chunk of consecutive tests
# (two tests with `--maxschedchunk 1`, set below), then one test at a time as they free up. The two
# fine-tuning tests share one worker: the first builds the testbed's reference model (their
# surrogates' source) under a lock the second would wait on. The audits go to the other worker, so
# no long test starts last (in one CI run all of them landed on one worker: 10 min alone at the end).
LONGEST = ("test_finetune_testbed.py::test_full_finetune", "test_finetune_testbed.py::test_lora_finetune",
           "test_audit.py::test_default_audit", "test_audit.py::test_bf16_audit",
           "test_gpu_check.py::test_cpu_check")


def _rank(item) -> int:
    return next((i for i, name in enumerate(LONGEST) if name in item.nodeid), len(LONGEST))


class _LongestFirst:
    @pytest.hookimpl(trylast=True)  # after -m has deselected
    def pytest_collection_modifyitems(self, config, items):
        if os.environ.get("PYTEST_XDIST_WORKER"):
            items.sort(key=_rank)  # stable: the rest keep pytest's order


def pytest_configure(config):
    config.pluginmanager.register(_LongestFirst(), "memtrain-longest-first")
    if getattr(config.option, "maxschedchunk", "absent") is None:  # xdist present, not set by the user
        config.option.maxschedchunk = 1


@pytest.fixture(scope="session")
def dev_testbed(tmp_path_factory) -> Path:
    """A small, barely trained testbed (same layout as the real one: model/, manifests/, clip/,
    testbed_card.json) with a 4-step default sampler so every evaluation takes seconds."""
    from memtrain.core.sampling import SamplerSettings
    from memtrain.testbed.build import TestbedConfig, build_testbed
    from memtrain.testbed.train_unet import TrainConfig, UNetConfig

    root = tmp_path_factory.mktemp("dev") / "testbed"
    config = TestbedConfig(
        n_unique=20, n_held_out=4, n_utility=10, clip_hidden=64, clip_layers=2, clip_steps=20,
        card_seeds=2, card_unique=4, unet=UNetConfig(block_out_channels=(32, 64)),
        train=TrainConfig(steps=20, warmup_steps=5, batch_size=8),
        sampler=SamplerSettings(scheduler="ddim", num_inference_steps=4, guidance_scale=3.0),
    )
    build_testbed(root, config=config, progress=False)
    return root


@pytest.fixture(scope="session")
def small_manifest(dev_testbed, tmp_path_factory) -> Path:
    """The first 4 memorized items."""
    items = read_manifest(dev_testbed / "manifests" / "memorized.jsonl")[:4]
    return write_manifest(tmp_path_factory.mktemp("manifests") / "small.jsonl", items)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models (much faster than two on shared cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """SD1.4's CLIP tokenizer, built offline."""
    return build_clip_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def golden(tmp_path_factory):
    """The golden-test fixture (tests/golden_fixture.py), built once per session."""
    import golden_fixture

    return golden_fixture.build(str(tmp_path_factory.mktemp("golden_tokenizer")))


@pytest.fixture
def fresh_accelerate():
    """In-process trainers share accelerate's singletons: reset them before the test (an earlier
    in-process command in the same worker may have set another precision) and after it."""
    from factories import reset_accelerate

    reset_accelerate()
    yield
    reset_accelerate()
    torch.set_num_threads(1)
