"""The core layer's own pieces: config (YAML 1.2 booleans, tuples, overrides), the one image
preprocessing, staged folders and locks, flags derived from a config dataclass."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Literal

import numpy as np
import pytest
import torch
from PIL import Image

from factories import tiny_bundle
from memtrain.core.cli import option, section
from memtrain.core.command_line import command_parser, parse_command_line
from memtrain.core.config import apply_overrides, build, parse_yaml
from memtrain.core.diffusion import derived_seed, images_to_latents, to_pixels
from memtrain.core.errors import MemtrainError
from memtrain.core.files import exclusive_lock, staged_dir
from memtrain.core.sampling import SamplerOverrides, SamplerSettings


@dataclasses.dataclass
class Section:
    precision: Literal["no", "fp16", "bf16"] = "no"
    init: str = "prompt"
    flag: bool = False
    pair: tuple[int, int] | None = None
    rate: float = 0.1


def test_yaml_keeps_no_off_yes_as_strings():
    data = parse_yaml("precision: no\ninit: off\nflag: true\nrate: 1e-3\n")
    assert data == {"precision": "no", "init": "off", "flag": True, "rate": "1e-3"}
    section = build(Section, data)
    assert (section.precision, section.init, section.flag, section.rate) == ("no", "off", True, 1e-3)
    assert build(Section, apply_overrides({}, ["precision=no", "flag=false"])).precision == "no"


def test_config_types_are_checked_by_key():
    assert build(Section, {"pair": [1, 2]}).pair == (1, 2)
    with pytest.raises(MemtrainError, match=r"'pair' must have 2 entries"):
        build(Section, {"pair": [1, 2, 3]})
    with pytest.raises(MemtrainError, match=r"unknown recipe key 'rat' \(did you mean 'rate'\?\)"):
        build(Section, {"rat": 1})
    with pytest.raises(MemtrainError, match=r"'flag' must be bool"):
        build(Section, {"flag": "yes"})


def test_images_of_any_size_and_mode_reach_the_same_latent_shape(tmp_path):
    """The one preprocessing (centre crop, resize) behind the audit, trainer, surrogates and
    reference model: LAION-like sizes and modes are not stacked raw."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (427, 640, 3), dtype=np.uint8)),
              Image.fromarray(rng.integers(0, 255, (500, 300), dtype=np.uint8), mode="L"),
              Image.fromarray(rng.integers(0, 255, (40, 50, 4), dtype=np.uint8), mode="RGBA"),
              Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).convert("P")]
    pixels = to_pixels(images, 16)
    assert pixels.shape == (4, 3, 16, 16) and pixels.min() >= -1 and pixels.max() <= 1
    bundle = tiny_bundle(tmp_path / "tok")
    latents = images_to_latents(bundle, images)
    assert latents.shape == (4, bundle.latent_channels, bundle.sample_size, bundle.sample_size)
    square = Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))  # already the size: untouched
    assert torch.equal(to_pixels([square], 16)[0], torch.from_numpy(np.asarray(square, np.float32)).permute(2, 0, 1) / 127.5 - 1)


def test_staged_dir_is_all_or_nothing(tmp_path):
    out = tmp_path / "out"
    with staged_dir(out) as tmp:
        (tmp / "a.txt").write_text("1")
    assert (out / "a.txt").read_text() == "1"
    with pytest.raises(RuntimeError):
        with staged_dir(out) as tmp:
            (tmp / "a.txt").write_text("2")
            raise RuntimeError("killed")
    assert (out / "a.txt").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_exclusive_lock_serialises_builders(tmp_path):
    order = []

    def worker(name: str) -> None:
        with exclusive_lock(tmp_path / "x.lock"):
            order.append(f"{name} in")
            time.sleep(0.2)
            order.append(f"{name} out")

    threads = [threading.Thread(target=worker, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert order[0][0] == order[1][0] and order[2][0] == order[3][0]  # never interleaved


def test_flags_are_derived_from_the_dataclass():
    @dataclasses.dataclass
    class Command:
        names: list[str] = option(dataclasses.MISSING, "names", "--name")
        count: int = option(3, "how many")
        progress: bool = option(True, "bars")
        sampler: SamplerOverrides = section(SamplerOverrides, "sampler changes", flat=True)

    def parse(argv):
        return parse_command_line(command_parser("test", "", Command), argv).config(Command)

    cfg = parse(["--name", "a", "b", "--steps", "4", "--no_progress"])
    assert cfg.names == ["a", "b"] and cfg.count == 3 and cfg.progress is False
    assert cfg.sampler == SamplerOverrides(num_inference_steps=4)
    assert SamplerSettings().with_overrides(cfg.sampler).num_inference_steps == 4
    assert parse(["--name", "a", "count=5", "sampler.guidance_scale=2"]).count == 5
    with pytest.raises(MemtrainError, match="required key 'names'"):
        parse([])  # --name is required


def test_seed_derivation_is_stable():
    assert derived_seed(0, 1) == derived_seed(0, 1) != derived_seed(1, 0)
    assert 0 <= derived_seed(5) < 2 ** 63


def test_load_image_takes_images_as_users_have_them(tmp_path):
    from memtrain.core.manifest import ManifestItem, load_image

    grey16 = (np.arange(16 * 24, dtype=np.uint16).reshape(16, 24) * 170).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "deep.png")  # a 16-bit PNG
    rgb = load_image(ManifestItem(id="deep", prompt="p", image=str(tmp_path / "deep.png")))
    arr = np.asarray(rgb)
    assert rgb.mode == "RGB" and arr.max() > 200 and arr.min() == 0  # scaled, not clipped to white
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (10, 20, 3), dtype=np.uint8))
    exif = photo.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    photo.save(tmp_path / "turned.jpg", exif=exif)
    assert load_image(ManifestItem(id="t", prompt="p", image=str(tmp_path / "turned.jpg"))).size == (10, 20)
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    red = np.asarray(load_image(ManifestItem(id="c", prompt="p", image=str(tmp_path / "cmyk.jpg"))))
    assert red[..., 0].mean() > 200 and red[..., 1].mean() < 60


def test_a_second_run_on_the_same_output_folder_is_refused(tmp_path):
    from memtrain.core.files import StagedOutput

    first = StagedOutput(tmp_path / "out")
    first.open()
    (first.tmp / "report.json").write_text("{}")
    with pytest.raises(MemtrainError, match="being written by another run"):
        StagedOutput(tmp_path / "out").open()
    first.commit()
    assert (tmp_path / "out" / "report.json").is_file()
    again = StagedOutput(tmp_path / "out", overwrite=True)  # the lock is free again
    again.open()
    again.abort()
    assert (tmp_path / "out" / "report.json").is_file()


def test_journal_round_trips_units_and_refuses_changed_runs(tmp_path):
    """Units come back exactly (arrays, lists of arrays, None, strings); a fresh run without
    --resume is refused while finished units exist; a changed fingerprint is named."""
    from dataclasses import dataclass

    import numpy as np

    from memtrain.core.errors import MemtrainError
    from memtrain.core.journal import WorkJournal, check_fresh_start, decoder, encode_records, journal_dir

    @dataclass
    class Row:
        index: int
        id: str
        scores: np.ndarray | None = None
        cells: list | None = None
        failed: str | None = None

    rows = [(0, Row(0, "a", np.arange(3, dtype=np.float32), [np.zeros((2, 2), np.uint8)])),
            (1, Row(1, "b", None, None, "non-finite loss"))]
    out = tmp_path / "out"
    calls = []
    journal = WorkJournal(out, {"seeds": 2}, resume=False)
    journal.unit("t.0", lambda: calls.append(1) or rows, encode_records, decoder(Row))
    again = WorkJournal(out, {"seeds": 2}, resume=True)
    back = again.unit("t.0", lambda: calls.append(2) or rows, encode_records, decoder(Row))
    assert calls == [1] and again.reused == 1
    assert [i for i, _ in back] == [0, 1] and back[1][1].failed == "non-finite loss" and back[1][1].scores is None
    assert back[0][1].scores.dtype == np.float32 and np.array_equal(back[0][1].scores, rows[0][1].scores)
    assert np.array_equal(back[0][1].cells[0], rows[0][1].cells[0])
    with pytest.raises(MemtrainError, match="pass --resume"):
        check_fresh_start(out, resume=False, overwrite=False)
    with pytest.raises(MemtrainError, match=r"cannot resume .*seeds \(interrupted run: 2, now: 3\)"):
        WorkJournal(out, {"seeds": 3}, resume=True)
    again.close()
    assert not journal_dir(out).exists()


def test_journal_refuses_to_resume_with_other_code(tmp_path):
    """The fingerprint records memtrain's version and commit; a run begun by other code is not
    resumed (its units may have been computed differently)."""
    import json

    import memtrain
    from memtrain.core.errors import MemtrainError
    from memtrain.core.journal import FINGERPRINT, WorkJournal, journal_dir
    from memtrain.core.provenance import code_version

    WorkJournal(tmp_path / "out", {"seeds": 2}, resume=False)
    saved_file = journal_dir(tmp_path / "out") / FINGERPRINT
    saved = json.loads(saved_file.read_text())
    assert saved["code"] == code_version() and saved["code"]["memtrain"] == memtrain.__version__
    WorkJournal(tmp_path / "out", {"seeds": 2}, resume=True)  # same code: resumes
    saved["code"]["memtrain"] = "0.0.0-older"
    saved_file.write_text(json.dumps(saved))
    with pytest.raises(MemtrainError, match=r"cannot resume .*code.*0\.0\.0-older"):
        WorkJournal(tmp_path / "out", {"seeds": 2}, resume=True)
