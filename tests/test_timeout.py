"""The process-group timeout (`timeout_minutes`) reaches the process group, and a collective
that times out stops the run with one line naming the setting."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from memtrain.core.errors import MemtrainError
from memtrain.core.runtime import RuntimeOptions

HELPER = Path(__file__).parent / "fixtures" / "collective_timeout.py"


def launch(timeout_minutes: float, sleep_s: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
                           str(HELPER), str(timeout_minutes), str(sleep_s)],
                          capture_output=True, text=True, env=env, timeout=240)


def test_a_short_timeout_fires_and_names_the_setting():
    proc = launch(timeout_minutes=0.05, sleep_s=20)  # 3 s timeout, the peer works 20 s
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: a collective")]
    assert errors, proc.stderr[-3000:]
    assert "timeout_minutes=0.05" in errors[0] and "raise timeout_minutes" in errors[0]
    assert "passed the barrier" not in proc.stdout.replace("rank 1 passed the barrier", "")


def test_the_default_timeout_waits_for_a_slow_peer():
    proc = launch(timeout_minutes=1, sleep_s=5)  # 60 s timeout, the peer works 5 s
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 passed the barrier" in proc.stdout and "rank 1 passed the barrier" in proc.stdout


@pytest.mark.parametrize("bad", [0, -1, "soon"])
def test_a_bad_timeout_is_one_line(bad):
    with pytest.raises(MemtrainError, match="timeout_minutes must be a positive number"):
        RuntimeOptions(timeout_minutes=bad)
