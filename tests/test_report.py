"""report.py (JSON, Markdown, grids, trackers, staged output) and distributed.py helpers."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(1)

from memtrain.core import run as dist  # noqa: E402
from memtrain.core import files, report, run  # noqa: E402
from memtrain.core.errors import MemtrainError  # noqa: E402
from memtrain.metrics import not_computed  # noqa: E402

# ----------------------------------------------------------------------------- distributed


@pytest.mark.parametrize("n,world", [(0, 2), (1, 2), (7, 2), (8, 3), (5, 8), (10, 1)])
def test_shards_cover_everything_once_and_balance(n, world):
    shards = [dist.shard_indices(n, world, r) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert all(s == sorted(s) and (not s or s[-1] - s[0] == len(s) - 1) for s in shards)  # contiguous


def test_shard_rejects_bad_rank():
    with pytest.raises(ValueError):
        dist.shard_indices(4, 2, 2)


def test_gather_in_order_single_process_restores_order():
    local = [(2, "c"), (0, "a"), (1, "b")]
    assert dist.gather_in_order(local) == ["a", "b", "c"]
    with pytest.raises(RuntimeError):
        dist.gather_in_order([(0, "a"), (0, "b")])


def test_shard_without_accelerator_is_everything():
    assert dist.shard(["x", "y"]) == [(0, "x"), (1, "y")]
    assert dist.world() == (0, 1) and dist.is_main()


def test_run_checked_raises_user_errors_and_passes_results():
    assert dist.run_checked(lambda: 3) == 3

    def bad():
        raise MemtrainError("unreadable image x.png")

    with pytest.raises(MemtrainError, match="unreadable"):
        dist.run_checked(bad)


# ----------------------------------------------------------------------------- JSON


def test_to_jsonable_converts_numpy_torch_paths_and_nan(tmp_path):
    data = {"a": np.float32(0.5), "b": np.arange(3), "c": torch.tensor([1.5]), "d": tmp_path,
            "e": float("nan"), "f": (np.int64(2), np.bool_(True)), 3: not_computed("no weights")}
    path = files.write_json(tmp_path / "sub" / "m.json", data)
    back = json.loads(path.read_text())
    assert back == {"a": 0.5, "b": [0, 1, 2], "c": [1.5], "d": str(tmp_path), "e": None, "f": [2, True],
                    "3": {"value": None, "status": "not computed", "reason": "no weights"}}


def test_scalar_figures_flattens_and_leaves_out_not_computed():
    figures = {"mr": 0.5, "n": 3, "fid": {"value": 12.0, "n_generated": 4, "backend": "x"},
               "a_clip": not_computed("no weights"), "seeds": [0, 1], "ok": True, "bad": float("inf")}
    assert report.scalar_figures(figures) == {"mr": 0.5, "n": 3.0, "fid/value": 12.0, "fid/n_generated": 4.0,
                                              "ok": 1.0}


# ----------------------------------------------------------------------------- Markdown


def test_markdown_table_spells_out_not_computed_and_escapes_pipes():
    rows = [{"id": "a|b", "score": 0.12345, "clip": not_computed("no CLIP weights"), "flag": True},
            {"id": "c", "score": None, "clip": 0.5, "flag": False}]
    table = report.markdown_table(rows, digits=2)
    lines = table.splitlines()
    assert lines[0] == "| id | score | clip | flag |"
    assert "a\\|b" in lines[2] and "0.12" in lines[2] and "not computed (no CLIP weights)" in lines[2]
    assert lines[3] == "| c | - | 0.50 | no |"
    assert report.markdown_table([]) == "_(no rows)_"


def test_markdown_report_renders_and_writes(tmp_path):
    md = (report.MarkdownReport("T").heading("Setup").key_values({"n": 3, "mr": 0.25})
          .bullets(["note one"]).bullets([]).image("grids/g.png", "g"))
    text = md.render()
    assert text.startswith("# T\n\n## Setup\n\n| figure | value |")
    assert "| mr | 0.250 |" in text and "- note one" in text and "![g](grids/g.png)" in text
    assert md.write(tmp_path / "r.md").read_text() == text


def test_format_value_cases():
    assert report.format_value(math.nan) == "-"
    assert report.format_value({"value": 1.0, "std": 0.25}) == "value=1.000, std=0.250"
    assert report.format_value([1, 2.5]) == "1, 2.500"
    assert report.format_value(np.int64(7)) == "7"


# ----------------------------------------------------------------------------- grids


def test_image_grid_layout_and_missing_cells():
    gen = torch.zeros(3, 8, 8)
    gen[0] = 1.0  # red
    ref = np.full((16, 16, 3), 255, np.uint8)
    rows = report.reference_rows([ref, None], [[gen, gen], [gen, gen]])
    grid = report.image_grid(rows, cell=32, pad=2)
    assert grid.size == (3 * 34 + 2, 2 * 34 + 2)
    px = grid.load()
    assert px[2 + 10, 2 + 10] == (255, 255, 255)  # training image
    assert px[2 + 34 + 10, 2 + 10] == (255, 0, 0)  # generation, enlarged with nearest neighbour
    assert px[2 + 10, 2 + 34 + 10] == (200, 200, 200)  # missing training image: grey
    with pytest.raises(ValueError):
        report.reference_rows([ref], [])


def test_thumbnail_shrinks_large_images():
    big = Image.new("RGB", (300, 200), "blue")
    assert report.thumbnail(big, 64).size == (64, 64)
    assert report.to_pil(np.zeros((4, 4, 3), np.float32)).size == (4, 4)


def test_save_grids_splits_rows(tmp_path):
    rows = [[np.zeros((4, 4, 3), np.uint8)] * 3 for _ in range(5)]
    written = report.save_grids(tmp_path / "grids", rows, [f"r{i}" for i in range(5)], rows_per_grid=2, cell=8)
    assert [p.name for p, _ in written] == ["grid_000.png", "grid_001.png", "grid_002.png"]
    assert [ids for _, ids in written] == [["r0", "r1"], ["r2", "r3"], ["r4"]]
    assert Image.open(written[0][0]).size == (3 * 10 + 2, 2 * 10 + 2)


# ----------------------------------------------------------------------------- trackers


class _FakeTracker:
    name = "wandb"

    def __init__(self):
        self.images, self.tables, self.finished = {}, {}, False

    def log_images(self, values, step=None):
        self.images.update(values)

    def log_table(self, name, columns=None, data=None, step=None):
        self.tables[name] = (columns, data)

    def finish(self):
        self.finished = True


class _FakeAccelerator:
    is_main_process = True

    def __init__(self):
        self.trackers = [_FakeTracker()]
        self.logged = []

    def log(self, values, step=None):
        self.logged.append((values, step))


def test_log_to_trackers_scalars_images_table_then_finish():
    acc = _FakeAccelerator()
    tracker = acc.trackers[0]
    run.log_to_trackers(acc, {"mr": 0.5, "a_clip": not_computed("none")},
                           images={"grids": [np.zeros((4, 4, 3), np.uint8)]},
                           table=(["id", "clip"], [["a", not_computed("none")], ["b", np.float32(0.5)]]))
    assert acc.logged == [({"mr": 0.5}, 0)]
    assert isinstance(tracker.images["grids"][0], Image.Image)
    assert tracker.tables["items"] == (["id", "clip"], [["a", "not computed (none)"], ["b", 0.5]])
    run.finish_trackers(acc)
    assert tracker.finished and acc.trackers == []


def test_log_to_trackers_is_a_noop_without_trackers():
    acc = _FakeAccelerator()
    acc.trackers = []
    run.log_to_trackers(acc, {"mr": 1.0})
    assert acc.logged == []


# ----------------------------------------------------------------------------- staged output


def test_staged_output_commits_atomically(tmp_path):
    out = tmp_path / "run"
    with files.StagedOutput(out) as tmp:
        (tmp / "metrics.json").write_text("{}")
        assert not out.exists()  # nothing visible until the end
    assert (out / "metrics.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_staged_output_failure_leaves_nothing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with files.StagedOutput(out) as tmp:
            (tmp / "half.json").write_text("{")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_refused_unless_overwrite(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    files.check_output_dir(out, overwrite=False)  # empty: nothing to lose
    (out / "old.txt").write_text("keep")
    with pytest.raises(MemtrainError, match="already exists"):
        files.StagedOutput(out)
    assert (out / "old.txt").read_text() == "keep"
    with files.StagedOutput(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (out / "old.txt").exists()  # the old output survives until the new one is complete
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(MemtrainError, match="is a file"):
        files.check_output_dir(tmp_path / "file", overwrite=True)
