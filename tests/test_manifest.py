"""The JSONL manifest: round trips, path handling, atomic writes and every bad-input message."""

import json
import logging
import os

import pytest
from PIL import Image

from memtrain.core.manifest import ManifestError, ManifestItem, load_image, read_manifest, write_manifest


def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _png(path, size=(8, 6), mode="RGBA"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, (10, 200, 30, 255)[: len(mode)] if mode != "L" else 77).save(path)
    return path


def test_round_trip_keeps_fields_extra_and_relative_paths(tmp_path):
    root = tmp_path / "deep"
    inside = _png(root / "images" / "a.png")
    sibling = _png(tmp_path / "images" / "s.png")
    outside = _png(tmp_path.parent / f"{tmp_path.name}_outside" / "b.png")
    items = [
        ManifestItem(id="a", prompt="Caf\u00e9 <i>x</i>", image=str(inside), url="http://u/a",
                     label="VM", source="webster", extra={"max_sscd": 0.9, "urls": ["x", "y"]}),
        ManifestItem(id="b", prompt="", image=str(outside)),
        ManifestItem(id="c", prompt="prompt only"),
        ManifestItem(id="d", prompt="sibling", image=str(sibling)),
    ]
    path = write_manifest(root / "m.jsonl", items)

    stored = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert stored[0]["image"] == "images/a.png"          # inside the folder: relative
    assert stored[1]["image"] == str(outside)             # outside: stays absolute
    assert stored[3]["image"] == "../images/s.png"        # sibling folder: moves with its parent
    assert "image" not in stored[2] and "url" not in stored[2]  # None fields are omitted
    assert stored[0]["max_sscd"] == 0.9 and "Caf\u00e9" in path.read_text(encoding="utf-8")

    back = read_manifest(path)
    assert back == items  # images come back absolute, extra preserved
    assert back[0].image == str(inside) and os.path.isabs(back[0].image)


def test_relative_image_resolves_against_manifest_folder_not_cwd(tmp_path, monkeypatch):
    _png(tmp_path / "data" / "images" / "x.png")
    path = _write_lines(tmp_path / "data" / "m.jsonl",
                        ['{"id": "x", "prompt": "p", "image": "images/x.png"}'])
    monkeypatch.chdir(tmp_path)
    (item,) = read_manifest(path)
    assert item.image == str(tmp_path / "data" / "images" / "x.png")
    assert load_image(item).size == (8, 6)


def test_integer_ids_become_strings_and_blank_lines_are_ignored(tmp_path):
    path = _write_lines(tmp_path / "m.jsonl", ['{"id": 123, "prompt": "p"}', "", "   "])
    (item,) = read_manifest(path)
    assert item.id == "123"


def test_known_fields_win_over_conflicting_extra(tmp_path):
    item = ManifestItem(id="a", prompt="p", extra={"id": "evil", "prompt": "evil", "k": 1})
    path = write_manifest(tmp_path / "m.jsonl", [item])
    assert json.loads(path.read_text()) == {"id": "a", "prompt": "p", "k": 1}


def test_write_is_atomic_old_file_survives_a_failed_replace(tmp_path, monkeypatch):
    path = write_manifest(tmp_path / "m.jsonl", [ManifestItem(id="old", prompt="p")])
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        write_manifest(path, [ManifestItem(id="new", prompt="q")])
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl"]  # no temp file left


def test_write_refuses_duplicate_ids(tmp_path):
    with pytest.raises(ManifestError, match="duplicate id 'a'"):
        write_manifest(tmp_path / "m.jsonl", [ManifestItem("a", "p"), ManifestItem("a", "q")])
    assert not (tmp_path / "m.jsonl").exists()


def test_write_creates_parent_folders(tmp_path):
    path = write_manifest(tmp_path / "new" / "deeper" / "m.jsonl", [ManifestItem("a", "p")])
    assert read_manifest(path)[0].id == "a"


BAD_MANIFESTS = [
    # (lines, expected message part, line number named or None)
    (['{"id": "a", "prompt": "p"}', "not json at all"], "line 2 is not a JSON object", 2),
    (['["a", "p"]'], "line 1 is not a JSON object", 1),
    (['{"id": "a", "prompt": "p"', ], "line 1 is not a JSON object", 1),
    (['{"id": "a", "caption": "p"}'], 'line 1 has no "prompt"', 1),
    (['{"id": "a", "prompt": 5}'], 'line 1 has no "prompt"', 1),
    (['{"id": "a", "prompt": "p"}', '{"prompt": "q"}'], 'line 2 has no "id"', 2),
    (['{"id": "  ", "prompt": "q"}'], 'line 1 has no "id"', 1),
    (['{"id": "a", "prompt": "p"}', '{"id": "b", "prompt": "q"}', '{"id": "a", "prompt": "r"}'],
     "duplicate id 'a' (first on line 1)", 3),
    (['{"id": "a", "prompt": "p", "url": ["x"]}'], '"url" must be a string or null', 1),
    ([], "manifest is empty", None),
    (["", "  "], "manifest is empty", None),
]


@pytest.mark.parametrize("lines,message,lineno", BAD_MANIFESTS)
def test_bad_manifest_messages_name_file_line_and_fix(tmp_path, lines, message, lineno):
    path = _write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    text = str(info.value)
    assert message in text
    assert str(path) in text and "\n" not in text
    if lineno is not None:
        assert f"{path}:{lineno}:" in text
    assert ";" in text  # every message ends with what to do
    assert isinstance(info.value, ValueError)


def test_missing_file_folder_and_binary_are_refused(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "nope.jsonl")
    with pytest.raises(ManifestError, match="is a folder"):
        read_manifest(tmp_path)
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ManifestError, match="not UTF-8"):
        read_manifest(tmp_path / "bin.jsonl")


def _manifest_with_missing_image(tmp_path):
    _png(tmp_path / "images" / "ok.png")
    return _write_lines(tmp_path / "m.jsonl", [
        '{"id": "ok", "prompt": "p", "image": "images/ok.png"}',
        '{"id": "gone", "prompt": "q", "image": "images/gone.png"}',
        '{"id": "none", "prompt": "r"}',
    ])


def test_require_images_skips_and_reports_missing(tmp_path, caplog):
    path = _manifest_with_missing_image(tmp_path)
    assert len(read_manifest(path)) == 3  # not required: nothing dropped
    with caplog.at_level(logging.WARNING):
        items = read_manifest(path, require_images=True)
    assert [it.id for it in items] == ["ok"]
    assert [it.id for it in items.missing] == ["gone", "none"]
    assert "skipped 2 of 3" in caplog.text and "'gone'" in caplog.text


def test_require_images_strict_raises_naming_the_item(tmp_path):
    path = _manifest_with_missing_image(tmp_path)
    with pytest.raises(ManifestError, match=r"item 'gone' image not found: .*gone\.png"):
        read_manifest(path, require_images=True, strict=True)


def test_require_images_with_no_image_at_all_raises(tmp_path):
    path = _write_lines(tmp_path / "m.jsonl", ['{"id": "a", "prompt": "p", "image": "x.png"}'])
    with pytest.raises(ManifestError, match="none of the 1 items has an existing image"):
        read_manifest(path, require_images=True)


def test_load_image_returns_rgb(tmp_path):
    for mode in ("RGBA", "L", "P"):
        p = tmp_path / f"{mode}.png"
        Image.new(mode, (5, 4)).save(p)
        im = load_image(ManifestItem(id=mode, prompt="p", image=str(p)))
        assert im.mode == "RGB" and im.size == (5, 4)


def test_load_image_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ManifestError, match=r"bad\.png: image of item 'x' cannot be read"):
        load_image(ManifestItem(id="x", prompt="p", image=str(bad)))
    with pytest.raises(ManifestError, match=r"missing\.png: image of item 'y' not found"):
        load_image(ManifestItem(id="y", prompt="p", image=str(tmp_path / "missing.png")))
    with pytest.raises(ManifestError, match="item 'z' has no image"):
        load_image(ManifestItem(id="z", prompt="p"))
