"""Input from the web treated as hostile: manifests whose paths or ids escape, images that are
bombs, truncated, zero-sized, of unknown type or in odd modes, URLs with other schemes or
redirecting to them, bodies over the limit, and code paths that would unpickle. Each is a
one-line error or a recorded skip, never a traceback, never a write outside the output folder."""

from __future__ import annotations

import http.server
import io
import json
import re
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from memtrain.core.manifest import MAX_IMAGE_PIXELS, ManifestError, ManifestItem, load_image, read_manifest
from memtrain.data.fetch import DeadLink, FetchOptions, download, file_stem

REPO = Path(__file__).resolve().parents[1]


def _manifest(folder: Path, line: dict) -> Path:
    path = folder / "manifests" / "m.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(line) + "\n")
    return path


# ----------------------------------------------------------------------------- manifests


@pytest.mark.parametrize("image", ["../../etc/passwd", "../../../x.png", "images/../../../y.png"])
def test_relative_image_paths_may_not_leave_the_dataset(tmp_path, image):
    path = _manifest(tmp_path / "data", {"id": "a", "prompt": "p", "image": image})
    with pytest.raises(ManifestError, match="points outside the manifest's dataset folder") as err:
        read_manifest(path)
    assert "\n" not in str(err.value)


def test_sibling_layout_and_absolute_paths_are_allowed(tmp_path):
    root = tmp_path / "data"
    inside = _manifest(root, {"id": "a", "prompt": "p", "image": "../images/a.png"})
    assert read_manifest(inside)[0].image == str(root / "images" / "a.png")
    absolute = _manifest(root, {"id": "a", "prompt": "p", "image": str(tmp_path / "elsewhere.png")})
    assert read_manifest(absolute)[0].image == str(tmp_path / "elsewhere.png")  # the user's own choice


def test_symlink_out_of_the_dataset_is_refused(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "images" / "link.png").symlink_to(tmp_path.parent)
    with pytest.raises(ManifestError, match="points outside"):
        read_manifest(_manifest(root, {"id": "a", "prompt": "p", "image": "../images/link.png/x"}))


@pytest.mark.parametrize("bad_id", ["a\nb", "nul\x00", "esc\x1b[2J"])
def test_ids_with_control_characters_are_refused(tmp_path, bad_id):
    with pytest.raises(ManifestError, match="control characters"):
        read_manifest(_manifest(tmp_path, {"id": bad_id, "prompt": "p"}))


@pytest.mark.parametrize("item_id", ["../../escape", "/etc/passwd", "..", "a/b\\c", "CON", "x" * 300])
def test_ids_become_safe_file_names(item_id):
    stem = file_stem(item_id)
    assert re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", stem) and not stem.startswith(".") and "/" not in stem


# ----------------------------------------------------------------------------- images


def _item(path: Path) -> ManifestItem:
    return ManifestItem(id="x", prompt="p", image=str(path))


def _png_header_claiming(path: Path, width: int, height: int) -> None:
    """A tiny PNG file whose header claims width x height (the body is irrelevant: never decoded)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:20] = width.to_bytes(4, "big")
    data[20:24] = height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # the IHDR chunk's CRC
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("side, guard", [(10_000, "decompression bomb guard"),  # 100 MP: Pillow only warns
                                          (100_000, "DecompressionBombError")])  # 10 GP: Pillow refuses too
def test_decompression_bomb_is_refused_before_decoding(tmp_path, side, guard):
    bomb = tmp_path / "bomb.png"
    _png_header_claiming(bomb, side, side)  # in a 70-byte file
    with pytest.raises(ManifestError, match=guard) as err:
        load_image(_item(bomb))
    assert side * side > MAX_IMAGE_PIXELS and "\n" not in str(err.value)


@pytest.mark.parametrize("kind", ["truncated", "empty", "unknown", "zero_sized"])
def test_broken_images_are_one_line_errors(tmp_path, kind):
    path = tmp_path / f"{kind}.png"
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    if kind == "truncated":
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "unknown":
        path.write_bytes(b"#!/bin/sh\nrm -rf /\n")
    else:
        _png_header_claiming(path, 0, 0)
    with pytest.raises(ManifestError) as err:
        load_image(_item(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK", "I;16", "animated"])
def test_odd_modes_load_as_rgb(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.gif" if mode == "animated" else "x.png")
    if mode == "animated":
        rgb.save(path, save_all=True, append_images=[rgb.rotate(90)], duration=100)
    elif mode == "I;16":
        Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 257)).save(path)
    else:
        rgb.convert(mode).save(path)
    im = load_image(_item(path))
    assert im.mode == "RGB" and im.size == (30, 20)


# ----------------------------------------------------------------------------- URLs


class _Hostile(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        routes = {"/to-file": "file:///etc/passwd", "/to-ftp": "ftp://127.0.0.1/x.png",
                  "/to-data": "data:image/png;base64,AAAA"}
        if self.path in routes:
            self.send_response(302)
            self.send_header("Location", routes[self.path])
            self.end_headers()
        elif self.path == "/html":
            body = b"<html>not an image</html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/huge":  # no Content-Length: the limit must hold while reading
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            for _ in range(64):
                self.wfile.write(b"\0" * 65536)
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def hostile_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


OPTS = FetchOptions(retries=0, timeout=5, max_bytes=1_000_000)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x.png", "data:image/png;base64,AAAA",
                                 "gopher://x", "/etc/passwd", "javascript:alert(1)"])
def test_non_http_urls_are_dead_links(url):
    with pytest.raises(DeadLink, match="unsupported URL scheme"):
        download(url, OPTS)


@pytest.mark.parametrize("route", ["/to-file", "/to-ftp", "/to-data"])
def test_redirects_to_other_schemes_are_not_followed(hostile_server, route):
    with pytest.raises(DeadLink, match="redirect to an unsupported URL scheme"):
        download(hostile_server + route, OPTS)


def test_wrong_content_type_and_oversized_bodies_are_dead_links(hostile_server):
    with pytest.raises(DeadLink, match="not an image"):
        download(hostile_server + "/html", OPTS)
    with pytest.raises(DeadLink, match="too large"):
        download(hostile_server + "/huge", OPTS)


# ----------------------------------------------------------------------------- code that would unpickle


def test_no_code_path_unpickles_or_runs_remote_code():
    """Only safetensors, JSON and YAML are read: every torch.load is weights_only=True, no pickle,
    no unsafe YAML loader, no numpy pickles, no remote code."""
    bad = {
        r"torch\.load\((?![^)]*weights_only=True)": "torch.load without weights_only=True",
        r"\bimport pickle\b|\bpickle\.load": "pickle",
        r"yaml\.load\((?![^)]*(SafeLoader|_Yaml12Loader))|yaml\.unsafe_load|yaml\.full_load": "unsafe YAML loader",
        r"allow_pickle\s*=\s*True": "numpy pickles",
        r"trust_remote_code\s*=\s*True": "remote code",
    }
    found = []
    for path in [*(REPO / "memtrain").rglob("*.py"), *(REPO / "scripts").rglob("*.py")]:
        text = path.read_text()
        for pattern, what in bad.items():
            for match in re.finditer(pattern, text):
                line = text[: match.start()].count("\n") + 1
                found.append(f"{path.relative_to(REPO)}:{line}: {what}")
    assert not found, found
    import yaml

    from memtrain.core.config import _Yaml12Loader

    assert issubclass(_Yaml12Loader, yaml.SafeLoader)  # the recipes' loader builds no Python objects
    with pytest.raises(yaml.YAMLError):
        yaml.load("!!python/object/apply:os.system ['true']", Loader=_Yaml12Loader)
