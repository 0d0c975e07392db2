"""The testbed: bad input is refused cleanly; the built testbed has its manifests and card,
and its card shows real memorization measured with the real SSCD."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from memtrain.core.manifest import read_manifest
from tests.conftest import REPO

SCRIPT = str(REPO / "scripts" / "build_testbed.py")


def run_build(*args, env=None):
    return subprocess.run([sys.executable, SCRIPT, "--no_progress", *args], capture_output=True, text=True, env=env)


def user_folder(tmp_path, lines, images=("a.png", "b.png")):
    folder = tmp_path / "data"
    folder.mkdir()
    for name in images:
        Image.fromarray(np.full((40, 40, 3), 120, np.uint8)).save(folder / name)
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    return folder


def assert_clean_failure(result, out, *needles):
    assert result.returncode != 0
    err_lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(err_lines) == 1, result.stderr
    for needle in needles:
        assert needle in err_lines[0]
    assert not out.exists(), "nothing may be written on bad input"


def test_missing_image_in_user_folder(tmp_path):
    data = user_folder(tmp_path, [{"file_name": "a.png", "text": "x", "duplicate": 5},
                                  {"file_name": "gone.png", "text": "y"}])
    out = tmp_path / "out"
    assert_clean_failure(run_build("--data_dir", str(data), "--output_dir", str(out)), out, "gone.png", "does not exist")


def test_unreadable_image_in_user_folder(tmp_path):
    data = user_folder(tmp_path, [{"file_name": "a.png", "text": "x", "duplicate": 5},
                                  {"file_name": "bad.png", "text": "y"}])
    (data / "bad.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    assert_clean_failure(run_build("--data_dir", str(data), "--output_dir", str(out)), out, "bad.png", "cannot be read")


def test_duplicate_spec_unknown_id(tmp_path):
    data = user_folder(tmp_path, [{"file_name": "a.png", "text": "x", "duplicate": 5},
                                  {"file_name": "b.png", "text": "y"}])
    out = tmp_path / "out"
    result = run_build("--data_dir", str(data), "--output_dir", str(out), "--duplicate_spec", '{"nope": 3}')
    assert_clean_failure(result, out, "unknown id 'nope'")


def test_standin_needs_flag(tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(run_build("--output_dir", str(out), "--metric", "standin"), out, "stand")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU refusal")
def test_cuda_device_without_gpu(tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(run_build("--output_dir", str(out), "--device", "cuda"), out, "--device cpu")


def test_existing_output_dir_is_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = run_build("--output_dir", str(out))
    assert result.returncode == 2 and "exists" in result.stderr
    assert (out / "precious.txt").read_text() == "keep me"


@pytest.mark.slow
def test_testbed_manifests(testbed_dir):
    ids = {}
    for split in ("memorized", "unique", "held_out", "utility"):
        items = read_manifest(testbed_dir / "manifests" / f"{split}.jsonl", require_images=True, strict=True)
        assert items, split
        assert all(it.label == split and it.prompt for it in items)
        ids[split] = {it.id for it in items}
        with Image.open(items[0].image) as im:
            assert im.size == (32, 32)
    for a in ids:
        for b in ids:
            assert a == b or not ids[a] & ids[b]
    assert (testbed_dir / "model" / "model_index.json").is_file()
    assert (testbed_dir / "clip" / "config.json").is_file()
    assert (testbed_dir / "grid.png").is_file()


@pytest.mark.slow
def test_testbed_card_shows_memorization(testbed_dir):
    card = json.loads((testbed_dir / "testbed_card.json").read_text())
    assert card["metric_backend"].startswith("sscd-onnx")
    assert card["seeds_per_input"] == 10
    mem, uni, held = card["memorized"], card["unique"], card["held_out"]
    assert mem["median_sscd"] >= 0.7  # it comes back in most seeds, not one lucky seed
    assert held["mr"] <= 0.05
    assert mem["d_sscd"] - uni["d_sscd"] >= 0.3


@pytest.mark.slow
def test_testbed_card_memorized_rate(testbed_dir):
    card = json.loads((testbed_dir / "testbed_card.json").read_text())
    assert card["memorized"]["mr"] >= 0.9
