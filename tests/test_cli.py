"""Command-line plumbing: thread count of a lone CPU process under `accelerate launch`."""

from __future__ import annotations

import os

import pytest

from memtrain.core.cli import cpu_threads_for_single_process


@pytest.fixture
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("ACCELERATE_") or key in ("WORLD_SIZE", "OMP_NUM_THREADS", "MEMTRAIN_NUM_THREADS"):
            monkeypatch.delenv(key)
    return monkeypatch


def test_accelerate_single_cpu_process_gets_all_cores(clean_env):
    # what `accelerate launch script.py` (no --cpu) sets for its one process
    clean_env.setenv("ACCELERATE_MIXED_PRECISION", "no")
    clean_env.setenv("OMP_NUM_THREADS", "1")
    assert cpu_threads_for_single_process() == (os.cpu_count() or 1)


def test_threads_left_alone_outside_that_case(clean_env):
    clean_env.setenv("OMP_NUM_THREADS", "1")
    assert cpu_threads_for_single_process() is None  # plain `python script.py`: the user's choice
    clean_env.setenv("ACCELERATE_MIXED_PRECISION", "no")
    clean_env.setenv("WORLD_SIZE", "2")
    assert cpu_threads_for_single_process() is None  # several processes share the cores


def test_memtrain_num_threads_wins(clean_env):
    clean_env.setenv("ACCELERATE_MIXED_PRECISION", "no")
    clean_env.setenv("OMP_NUM_THREADS", "1")
    clean_env.setenv("MEMTRAIN_NUM_THREADS", "3")
    assert cpu_threads_for_single_process() == 3
