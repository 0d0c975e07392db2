"""The image fetcher against a local HTTP server: dead links of every kind, and resuming."""

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from memtrain.data import ManifestError, ManifestItem, fetch_images, load_image, read_manifest
from memtrain.core.manifest import write_manifest
from memtrain.data.fetch import file_stem
from memtrain.core.errors import MemtrainError

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "fetch_images.py"


def _image_bytes(fmt, size=(32, 24), seed=0, noise=False):
    rng = np.random.default_rng(seed)
    if noise:
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    else:
        arr = np.zeros((size[1], size[0], 3), np.uint8) + rng.integers(0, 256, 3, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


class Server:
    """A loopback HTTP server; routes map a path to (status, content-type, body, options)."""

    def __init__(self):
        self.routes = {}
        self.log = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                with server.lock:
                    server.log.append(self.path)
                    count = server.log.count(self.path)
                route = server.routes.get(self.path)
                if route is None:
                    return self._send(404, "text/plain", b"not found", {})
                status, ctype, body, opts = route(count) if callable(route) else route
                self._send(status, ctype, body, opts)

            def _send(self, status, ctype, body, opts):
                try:
                    if opts.get("delay"):
                        opts["delay"].wait(opts.get("max_wait", 20))
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    if not opts.get("no_length"):
                        self.send_header("Content-Length", str(opts.get("length", len(body))))
                    self.end_headers()
                    half = opts.get("stall_after")
                    if half is not None:  # send part of the body, then hang
                        self.wfile.write(body[:half])
                        self.wfile.flush()
                        opts["stall"].wait(opts.get("max_wait", 20))
                        body = body[half:]
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout, or killed on purpose)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def requests(self):
        with self.lock:
            return Counter(self.log)

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def _manifest(tmp_path, server, paths, name="in.jsonl"):
    items = [ManifestItem(id=i, prompt=f"prompt {i}", url=server.url + p if p else None,
                          label="VM") for i, p in paths.items()]
    return write_manifest(tmp_path / name, items)


def test_fetch_reports_each_dead_link_and_keeps_the_good(tmp_path, server):
    png, jpg = _image_bytes("PNG", seed=1), _image_bytes("JPEG", seed=2)
    big = _image_bytes("PNG", size=(200, 200), noise=True)  # ~120 kB, over the 50 kB cap

    def flaky_route(count):  # fails once with 503, then works: retried, not dead
        return (503, "text/plain", b"busy", {}) if count == 1 else (200, "image/png", png, {})

    server.routes.update({
        "/good.png": (200, "image/png", png, {}),
        "/good.jpg": (200, "image/jpeg; charset=binary", jpg, {}),
        "/octet.jpg": (200, "application/octet-stream", jpg, {}),
        "/flaky.png": flaky_route,
        "/alt.png": (200, "image/png", png, {}),
        "/slow.png": (200, "image/png", png, {"delay": server.stop, "max_wait": 5}),
        "/truncated.png": (200, "image/png", png[: len(png) // 2], {}),
        "/truncated.jpg": (200, "image/jpeg", jpg[: len(jpg) - 200], {}),
        "/short.png": (200, "image/png", png, {"length": len(png) + 100}),
        "/page.html": (200, "text/html", b"<html>moved</html>", {}),
        "/big.png": (200, "image/png", big, {}),
        "/big_stream.png": (200, "image/png", big, {"no_length": True}),
        "/junk.bin": (200, "application/octet-stream", b"\x00\x01 not an image" * 20, {}),
        "/gone": (410, "text/plain", b"gone", {}),
    })
    manifest = _manifest(tmp_path, server, {
        "good_png": "/good.png", "good_jpg": "/good.jpg", "octet": "/octet.jpg",
        "flaky": "/flaky.png", "missing": "/missing.png", "slow": "/slow.png",
        "truncated": "/truncated.png", "truncated_jpg": "/truncated.jpg",
        "short": "/short.png", "html": "/page.html", "big": "/big.png",
        "big_stream": "/big_stream.png", "junk": "/junk.bin", "gone": "/gone",
        "no_url": None, "weird/id #1": "/good.png",
    })
    # MemBench-style item: the first URL is dead, an alternative in extra["urls"] works
    items = read_manifest(manifest)
    items.append(ManifestItem(id="fallback", prompt="p", label="VM",
                              url=server.url + "/missing2.png",
                              extra={"urls": [server.url + "/missing2.png",
                                              server.url + "/alt.png"]}))
    write_manifest(manifest, items)

    t0 = time.monotonic()
    report = fetch_images(manifest, tmp_path / "out", workers=6, timeout=0.5, retries=1,
                          max_bytes=50_000, backoff=0.01, progress=False)
    assert time.monotonic() - t0 < 10

    reasons = {d["id"]: d["reason"] for d in report["dead"]}
    assert all(set(d) == {"id", "url", "reason"} for d in report["dead"])
    assert reasons["missing"] == "HTTP 404"
    assert reasons["gone"] == "HTTP 410"
    assert reasons["slow"].startswith("timeout") and "2 attempts" in reasons["slow"]
    assert "not a decodable image" in reasons["truncated"]
    assert "not a decodable image" in reasons["truncated_jpg"]
    assert reasons["short"] == ("connection closed before the body was complete "
                                "(after 2 attempts)")
    assert reasons["html"] == "not an image (content-type text/html)"
    assert reasons["big"].startswith("too large (") and "50000" in reasons["big"]
    assert reasons["big_stream"].startswith("too large (over max_bytes")
    assert "not a decodable image" in reasons["junk"]
    assert reasons["no_url"] == "no url"
    assert set(reasons) == {"missing", "gone", "slow", "truncated", "truncated_jpg", "short",
                            "html", "big", "big_stream",
                            "junk", "no_url"}
    by_id = {d["id"]: d for d in report["dead"]}
    assert by_id["html"]["url"] == server.url + "/page.html" and by_id["no_url"]["url"] is None

    hits = server.requests()
    assert hits["/flaky.png"] == 2 and hits["/missing.png"] == 1  # 404 is not retried
    assert hits["/slow.png"] == 2 and hits["/page.html"] == 1

    out = read_manifest(tmp_path / "out" / "manifest.jsonl", require_images=True, strict=True)
    good = ["good_png", "good_jpg", "octet", "flaky", "weird/id #1", "fallback"]
    assert [it.id for it in out] == good  # input order
    for it in out:
        assert Path(it.image).parent == tmp_path / "out" / "images"
        assert load_image(it).size == (32, 24)
        assert it.label == "VM" and it.url
    assert Path(out[1].image).suffix == ".jpg" and Path(out[0].image).suffix == ".png"
    assert out[5].extra["fetched_url"] == server.url + "/alt.png"
    assert Path(out[0].image).read_bytes() == png  # the server's bytes, not a re-encode

    on_disk = json.loads((tmp_path / "out" / "fetch_report.json").read_text())
    assert on_disk == report
    assert report["fetched"] == 6 and report["skipped_existing"] == 0 and report["total"] == 17
    # nothing half-written or temporary is left in the images folder
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == sorted(
        Path(it.image).name for it in out)


def test_rerun_in_process_skips_existing_and_refetches_corrupt(tmp_path, server):
    png = _image_bytes("PNG")
    server.routes.update({f"/{i}.png": (200, "image/png", png, {}) for i in range(3)})
    manifest = _manifest(tmp_path, server, {f"i{i}": f"/{i}.png" for i in range(3)})
    fetch_images(manifest, tmp_path / "out", workers=2, progress=False)
    (tmp_path / "out" / "images" / "i1.png").write_bytes(png[:40])  # damaged by hand
    (tmp_path / "out" / "images" / ".i2.png.abc.part").write_bytes(b"x")  # a killed run's temp
    report = fetch_images(manifest, tmp_path / "out", workers=2, progress=False)
    assert report["skipped_existing"] == 2 and report["fetched"] == 3
    assert server.requests() == Counter({"/0.png": 1, "/1.png": 2, "/2.png": 1})
    assert not list((tmp_path / "out" / "images").glob(".*"))


def test_file_stem_is_safe_and_unique():
    assert file_stem("1030727993") == "1030727993"
    a, b = file_stem("a/b"), file_stem("a_b")
    assert a != b and "/" not in a and b == "a_b"
    assert not file_stem("..hidden").startswith(".")


def _run_script(*args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _completed_files(images):
    return {p.name for p in images.iterdir() if not p.name.startswith(".")} if images.exists() \
        else set()


def test_resume_after_sigkill_never_refetches_completed_images(tmp_path, server):
    gate = threading.Event()
    n = 8
    for i in range(n):
        body = _image_bytes("PNG", seed=i)
        if i < 4:
            opts = {}
        elif i == 4:  # half the body arrives, then the server stalls until the gate opens
            opts = {"stall_after": len(body) // 2, "stall": gate}
        else:
            opts = {"delay": gate}
        server.routes[f"/r/{i}.png"] = (200, "image/png", body, opts)
    manifest = _manifest(tmp_path, server, {**{f"r{i}": f"/r/{i}.png" for i in range(n)},
                                            "dead": "/nothing.png"})
    out = tmp_path / "out"
    args = (manifest, "--output_dir", out, "--workers", 2, "--timeout", 30, "--retries", 0,
            "--no_progress")

    proc = _run_script(*args)
    deadline = time.monotonic() + 20
    while len(_completed_files(out / "images")) < 4 and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    done_before = _completed_files(out / "images")
    assert done_before == {f"r{i}.png" for i in range(4)}
    assert not (out / "manifest.jsonl").exists()  # the run never finished
    for name in done_before:  # every file that counts as done is a whole image
        Image.open(out / "images" / name).load()

    gate.set()
    proc = _run_script(*args)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr  # a dead link does not make the run fail
    assert "fetched 8 of 9 (4 already present), 1 dead" in stdout

    hits = server.requests()
    for i in range(4):
        assert hits[f"/r/{i}.png"] == 1, f"/r/{i}.png was fetched again after the kill"
    report = json.loads((out / "fetch_report.json").read_text())
    assert report["fetched"] == 8 and report["skipped_existing"] == 4
    assert report["dead"] == [{"id": "dead", "url": server.url + "/nothing.png",
                               "reason": "HTTP 404"}]
    items = read_manifest(out / "manifest.jsonl", require_images=True, strict=True)
    assert [it.id for it in items] == [f"r{i}" for i in range(n)]
    for i, it in enumerate(items):
        assert Path(it.image).read_bytes() == _image_bytes("PNG", seed=i)
    assert not list((out / "images").glob(".*"))


@pytest.mark.parametrize("content,message", [
    (None, "file not found"),
    ("this is not json\n", "line 1 is not a JSON object"),
    ('{"id": "a", "prompt": "p"}\n{"id": "b", "prompt": "q"}\n', "none of its 2 items has a \"url\""),
])
def test_script_bad_input_is_one_line_and_nonzero(tmp_path, content, message):
    manifest = tmp_path / "m.jsonl"
    if content is not None:
        manifest.write_text(content)
    proc = _run_script(manifest, "--output_dir", tmp_path / "out", "--no_progress")
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert str(manifest) in lines[0]


def test_bad_options_are_refused(tmp_path):
    manifest = write_manifest(tmp_path / "manifest.jsonl", [ManifestItem("a", "p", url="http://x/")])
    with pytest.raises(MemtrainError, match="input is this run's output manifest"):
        fetch_images(manifest, tmp_path, progress=False)
    with pytest.raises(MemtrainError, match="workers >= 1"):
        fetch_images(manifest, tmp_path / "out", workers=0, progress=False)
    with pytest.raises(ManifestError):
        fetch_images(tmp_path / "missing.jsonl", tmp_path / "out", progress=False)
