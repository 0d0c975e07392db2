"""Loaders for public memorized-prompt releases, on small made-up files in each real format."""

import shutil
from pathlib import Path

import pytest

from memtrain.data import (ManifestError, detect_format, load_release, normalize_label,
                           read_manifest, write_manifest)

FIX = Path(__file__).parent / "fixtures" / "releases"
PAPER_KITES = '"Listen to The Paper Kites\' New Song, ""Orbit"""'


@pytest.mark.parametrize("name,fmt", [
    ("wen_memorized.jsonl", "webster"),
    ("nemo_memorized.csv", "nemo"),
    ("nemo_unmemorized.csv", "nemo"),
    ("membench_sd1.csv", "membench"),
    ("prompts.txt", "prompts"),
    ("manifest.jsonl", "manifest"),
])
def test_detect_format(name, fmt):
    assert detect_format(FIX / name) == fmt


def test_wen_jsonl_uses_laion_index_as_id_and_has_no_label():
    items = load_release(FIX / "wen_memorized.jsonl")
    assert [it.id for it in items] == ["1100000001", "1100000002", "1100000003", "1100000004"]
    assert items[2].prompt == PAPER_KITES  # quotes kept verbatim: the exact text is the trigger
    assert items[3].prompt == "Caf\u00e9 Mornings with <i>Dr. Wren</i>"
    assert items[1].url == "https://cdn.example.net/paint/seafoam-foyer.jpeg?quality=100"
    assert {it.label for it in items} == {None} and {it.source for it in items} == {"webster"}
    assert all(it.extra == {} for it in items)


def test_nemo_csv_semicolons_quotes_labels_and_scores():
    items = load_release(FIX / "nemo_memorized.csv")
    assert [it.id for it in items] == ["1100000001", "1100000002", "1100000003", "1100000005"]
    assert [it.label for it in items] == ["VM", "TM", "VM", "TM"]
    assert items[3].prompt == "Wall Art; Blue Fractal - 5 Panels"  # ';' inside a quoted cell
    assert items[0].extra == {"mean_sscd": 0.8512, "max_sscd": 0.8733}
    assert {it.source for it in items} == {"nemo"}
    # the same LAION image gets the same id and the same prompt in Wen's and NeMo's files
    wen = {it.id: it.prompt for it in load_release(FIX / "wen_memorized.jsonl")}
    assert all(wen[it.id] == it.prompt for it in items if it.id in wen)


def test_nemo_unmemorized_keeps_string_index_and_empty_url():
    items = load_release(FIX / "nemo_unmemorized.csv", default_label="N")
    assert [it.id for it in items] == ["0042", "0043", "0044"]  # leading zeros kept
    assert items[1].url is None
    assert [it.label for it in items] == ["N", "N", "N"]


def test_membench_url_lists_hash_ids_and_hash_prompts():
    items = load_release(FIX / "membench_sd1.csv")
    assert len(items) == 4 and {it.label for it in items} == {"memorized"}
    assert items[0].url == "https://img.example.org/albumart/quiet_lighthouse.jpg"
    assert "urls" not in items[0].extra  # single URL: nothing extra to keep
    assert items[1].url == "https://cdn.example.net/rugs/navy-1.jpg"
    assert items[1].extra["urls"][1:] == ["https://cdn.example.net/rugs/navy-2.jpg",
                                          "https://cdn.example.net/rugs/navy-3.jpg"]
    assert items[2].prompt == "##relieve cream / navy area rug"  # '#' is not a comment
    assert all(it.id.startswith("p") and len(it.id) == 16 for it in items)


def test_hash_ids_are_stable_across_runs_and_row_order(tmp_path):
    first = {it.prompt: it.id for it in load_release(FIX / "membench_sd1.csv")}
    lines = (FIX / "membench_sd1.csv").read_text().splitlines()
    (tmp_path / "shuffled.csv").write_text("\n".join([lines[0]] + lines[1:][::-1]) + "\n")
    shuffled = {it.prompt: it.id for it in load_release(tmp_path / "shuffled.csv")}
    assert shuffled == first
    assert load_release(FIX / "membench_sd1.csv") == load_release(FIX / "membench_sd1.csv")


def test_prompts_file_strips_skips_blank_and_suffixes_repeats():
    items = load_release(FIX / "prompts.txt", default_label="memorized")
    assert [it.prompt for it in items] == ["The Quiet Lighthouse Podcast",
                                           "Foyer painted in SEAFOAM",
                                           "#1 Best Sunset Poster - Framed Print",
                                           "The Quiet Lighthouse Podcast"]
    assert items[3].id == items[0].id + "#2"
    assert {it.source for it in items} == {"prompts"} and {it.label for it in items} == {"memorized"}
    assert all(it.url is None for it in items)


def test_manifest_format_goes_through_read_manifest():
    items = load_release(FIX / "manifest.jsonl")
    assert [it.id for it in items] == ["a1", "a2", "a3"]
    assert items[0].image == str(FIX / "images" / "a1.png")
    assert items[0].extra == {"max_sscd": 0.87}


def test_webster_groundtruth_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = {
        "caption": ["Mothers of the misty hills", "Shaw Floors Tile 00105_X1",
                    "Galaxy Canvas Boots", "An ordinary photo"],
        "url": ["https://a.example/1.jpg", "https://a.example/2.jpg",
                "https://a.example/3.jpg", "https://a.example/4.jpg"],
        "overfit_type": ["MV", "TV", "RV", "N"],
        "retrieved_urls": [[], ["https://t.example/t1.jpg"], ["https://r.example/r.jpg"], []],
        "mse_real_gen": [812.5, 9100.0, 8000.0, 12000.0],
    }
    pq.write_table(pa.table(rows), tmp_path / "sdv1_wb_groundtruth.parquet")
    items = load_release(tmp_path / "sdv1_wb_groundtruth.parquet")
    assert [it.label for it in items] == ["VM", "TM", "RV", "N"]
    assert [it.extra.get("release_label") for it in items] == ["MV", "TV", None, None]
    assert items[2].extra["retrieved_urls"] == ["https://r.example/r.jpg"]
    assert items[0].extra["mse_real_gen"] == 812.5
    assert all(it.id.startswith("p") for it in items)  # no index column: prompt hashes
    # extras survive the manifest round trip
    back = read_manifest(write_manifest(tmp_path / "m.jsonl", items))
    assert back == items


def test_every_format_round_trips_through_a_manifest(tmp_path):
    for name in ("wen_memorized.jsonl", "nemo_memorized.csv", "membench_sd1.csv", "prompts.txt"):
        items = load_release(FIX / name)
        assert read_manifest(write_manifest(tmp_path / f"{name}.jsonl", items)) == items


def test_fmt_overrides_detection(tmp_path):
    shutil.copy(FIX / "wen_memorized.jsonl", tmp_path / "release.data")
    with pytest.raises(ManifestError, match="cannot tell the format"):
        load_release(tmp_path / "release.data")
    assert len(load_release(tmp_path / "release.data", fmt="webster")) == 4


def test_normalize_label():
    assert [normalize_label(x) for x in ("MV", "vm", "TV", " TM ", "RV", "N", "None", "", None,
                                         "held_out")] == ["VM", "VM", "TM", "TM", "RV", "N", "N",
                                                          None, None, "held_out"]


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name,text,fmt,message", [
    ("x.csv", "a,b\n1,2\n", None, "neither a Caption nor a prompt column"),
    ("x.csv", "a,b\n1,2\n", "nemo", "has no caption / prompt column"),
    ("x.csv", ",prompt,urls\n0,hi,['http://a\n", "membench", "line 2: urls is not a list literal"),
    ("x.csv", ",prompt,urls\n0,hi,x,y,z\n", "membench", "line 2 has more cells than the header"),
    ("x.jsonl", '{"caption": "a"}\nnot json\n', "webster", "line 2 is not a JSON object"),
    ("x.jsonl", "", None, "is empty"),
    ("x.txt", "\n  \n", None, "holds no prompts"),
    ("x.csv", ";Caption;URL\n0;;http://a\n", None, "holds no prompts"),
    ("x.yaml", "a: b\n", None, "cannot tell the format"),
])
def test_bad_release_files(tmp_path, name, text, fmt, message):
    path = _write(tmp_path / name, text)
    with pytest.raises(ManifestError) as info:
        load_release(path, fmt=fmt)
    assert message in str(info.value) and str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_release_and_unknown_format(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        load_release(tmp_path / "nope.csv")
    with pytest.raises(ManifestError, match="unknown release format 'laion'"):
        load_release(FIX / "prompts.txt", fmt="laion")
