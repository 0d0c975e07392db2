"""Download the training images behind a manifest's URLs, robustly and resumably.

Layout of the output folder:
    DIR/images/<id>.<ext>     one file per fetched item, the server's bytes unchanged
    DIR/manifest.jsonl        the fetched items, ``image`` pointing at those files
    DIR/fetch_report.json     {"fetched": N, "dead": [{"id", "url", "reason"}], ...}

Every image is checked (content type, size cap, Pillow verify + full decode) before it is
written, and written atomically, so a file in DIR/images is always a complete image: a rerun
trusts it and never requests that item again. Run one fetcher per output folder at a time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import io
import json
import logging
import os
import random
import re
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from memtrain.core.errors import MemtrainError
from memtrain.core.files import atomic_write_bytes, atomic_write_text
from memtrain.core.report import versioned
from memtrain.core.manifest import ManifestError, ManifestItem, write_manifest
from memtrain.data.releases import load_release

log = logging.getLogger(__name__)

USER_AGENT = "memtrain-fetch/0.1 (+research; image availability check)"
_CHUNK = 64 * 1024
# Hosts often serve images as octet-stream; the decode check still rejects non-images.
_GENERIC_TYPES = ("application/octet-stream", "binary/octet-stream")
_EXT = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp",
        "BMP": ".bmp", "TIFF": ".tiff", "ICO": ".ico"}


@dataclass(frozen=True)
class FetchOptions:
    """How the fetcher downloads: parallelism, timeouts, retries, size limit, TLS checking."""

    workers: int = 8
    timeout: float = 10.0        # seconds per connect / read; the whole body gets 6x this
    retries: int = 3             # extra attempts after the first, for transient failures only
    max_bytes: int = 20_000_000
    backoff: float = 0.5         # first retry delay; doubles each retry
    verify_tls: bool = True      # False accepts expired/self-signed certificates (old hosts)

    def check(self) -> None:
        if self.workers < 1 or self.retries < 0 or self.timeout <= 0 or self.max_bytes <= 0:
            raise MemtrainError(f"bad fetch options {self}: need workers >= 1, retries >= 0, "
                                "timeout > 0, max_bytes > 0")
        if self.backoff < 0:
            raise MemtrainError(f"bad fetch options {self}: backoff must be >= 0")


class DeadLink(Exception):
    """One failed attempt at a URL; ``transient`` ones are worth retrying."""

    def __init__(self, reason: str, transient: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.transient = transient


# ---------------------------------------------------------------- one URL


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to http(s): urllib's own handler also follows ftp:, and a hostile
    host could point a LAION URL at a local or internal resource that way."""

    def http_error_302(self, req, fp, code, msg, headers):
        target = urllib.parse.urljoin(req.full_url, headers.get("location") or headers.get("uri") or "")
        if not target.lower().startswith(("http://", "https://")):
            fp.close()
            raise DeadLink(f"redirect to an unsupported URL scheme: {target.split(':', 1)[0]!r}")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _open(url: str, opts: FetchOptions):
    if not url.lower().startswith(("http://", "https://")):
        raise DeadLink(f"unsupported URL scheme: {url.split(':', 1)[0]!r}")
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept": "image/*"})
    context = ssl.create_default_context()
    if not opts.verify_tls:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    opener = urllib.request.build_opener(_HttpOnlyRedirects, urllib.request.HTTPSHandler(context=context))
    try:
        return opener.open(req, timeout=opts.timeout)
    except urllib.error.HTTPError as e:
        e.close()
        # 408/425/429 and 5xx may pass; other 4xx (404, 403, 410) will not
        raise DeadLink(f"HTTP {e.code}", transient=e.code in (408, 425, 429) or e.code >= 500)
    except urllib.error.URLError as e:
        if isinstance(e.reason, (socket.timeout, TimeoutError)):
            raise DeadLink("timeout", transient=True) from None
        if isinstance(e.reason, ssl.SSLError):  # a bad certificate stays bad
            raise DeadLink(f"TLS error ({e.reason}); see verify_tls / --insecure") from None
        transient = not isinstance(e.reason, socket.gaierror)  # unknown host stays unknown
        raise DeadLink(f"connection failed ({e.reason})", transient=transient) from None
    except (socket.timeout, TimeoutError):
        raise DeadLink("timeout", transient=True) from None
    except (http.client.HTTPException, OSError) as e:
        raise DeadLink(f"connection failed ({type(e).__name__}: {e})", transient=True) from None


def _check_headers(resp, opts: FetchOptions) -> None:
    ctype = (resp.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if ctype and not ctype.startswith("image/") and ctype not in _GENERIC_TYPES:
        raise DeadLink(f"not an image (content-type {ctype})")
    length = resp.headers.get("Content-Length")
    if length and length.isdigit() and int(length) > opts.max_bytes:
        raise DeadLink(f"too large ({length} bytes > max_bytes {opts.max_bytes})")


def _read_body(resp, opts: FetchOptions) -> bytes:
    deadline = time.monotonic() + 6 * opts.timeout  # a trickling server must not hang a worker
    length = resp.headers.get("Content-Length", "")
    expected = int(length) if length.isdigit() else None
    buf = bytearray()
    try:
        while True:
            chunk = resp.read(_CHUNK)
            if not chunk:
                # read(n) returns b"" on a short body instead of raising IncompleteRead
                if expected is not None and len(buf) < expected:
                    raise http.client.IncompleteRead(bytes(buf), expected - len(buf))
                return bytes(buf)
            buf += chunk
            if len(buf) > opts.max_bytes:
                raise DeadLink(f"too large (over max_bytes {opts.max_bytes})")
            if time.monotonic() > deadline:
                raise DeadLink("timeout (body too slow)", transient=True)
    except (socket.timeout, TimeoutError):
        raise DeadLink("timeout", transient=True) from None
    except http.client.IncompleteRead:
        raise DeadLink("connection closed before the body was complete", transient=True) from None
    except (http.client.HTTPException, OSError) as e:
        raise DeadLink(f"read failed ({type(e).__name__}: {e})", transient=True) from None


def decode_check(data: bytes) -> str:
    """Verify and fully decode image bytes; return the file extension for their format."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format or ""
            im.verify()  # structure and checksums
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # verify() misses truncated pixel data; a full decode does not
    except Image.DecompressionBombError:
        raise DeadLink("image too large in pixels (decompression bomb guard)") from None
    except Exception as e:  # Pillow raises many types for corrupt data
        raise DeadLink(f"not a decodable image ({type(e).__name__}: {e})") from None
    return _EXT.get(fmt, "." + (fmt.lower() or "img"))


def download(url: str, opts: FetchOptions) -> tuple[bytes, str]:
    """Fetch one URL with retries and exponential backoff; return (bytes, extension)."""
    for attempt in range(opts.retries + 1):
        try:
            with _open(url, opts) as resp:
                _check_headers(resp, opts)
                data = _read_body(resp, opts)
            if not data:
                raise DeadLink("empty body")
            return data, decode_check(data)
        except DeadLink as e:
            if not e.transient or attempt == opts.retries:
                if e.transient and opts.retries:
                    e.reason += f" (after {opts.retries + 1} attempts)"
                raise
            time.sleep(opts.backoff * (2 ** attempt) * (1 + 0.25 * random.random()))
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- one item


def file_stem(item_id: str) -> str:
    """A safe, unique file name stem for an id (ids may hold '/', '#', spaces ...)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", item_id).lstrip(".")[:80]
    if stem != item_id:  # altered: add a hash so two ids cannot collide
        stem = f"{stem}-{hashlib.sha1(item_id.encode('utf-8')).hexdigest()[:8]}"
    return stem


def _candidate_urls(item: ManifestItem) -> list[str]:
    urls = [item.url] if item.url else []
    alternatives = item.extra.get("urls")
    if isinstance(alternatives, list):  # MemBench: several images match one prompt
        urls += [u for u in alternatives if isinstance(u, str) and u and u not in urls]
    return urls


def _fetch_item(item: ManifestItem, stem: str, images_dir: Path,
                opts: FetchOptions) -> tuple[Path | None, str | None, str]:
    """Return (image path, url used, '') on success or (None, None, reason) when dead."""
    first_reason = "no url"
    for i, url in enumerate(_candidate_urls(item)):
        try:
            data, ext = download(url, opts)
        except DeadLink as e:
            if i == 0:
                first_reason = e.reason
            continue
        except Exception as e:  # never let one odd link stop the run
            if i == 0:
                first_reason = f"unexpected error ({type(e).__name__}: {e})"
            continue
        path = images_dir / f"{stem}{ext}"
        atomic_write_bytes(path, data)
        return path, url, ""
    n = len(_candidate_urls(item))
    return None, None, first_reason + (f"; {n - 1} alternative urls also failed" if n > 1 else "")


# ---------------------------------------------------------------- the whole manifest


def _existing_images(images_dir: Path) -> dict[str, Path]:
    """Map stem -> complete image file; removes temp files a killed run left behind."""
    found: dict[str, Path] = {}
    for path in images_dir.iterdir():
        if path.name.startswith("."):
            if path.name.endswith(".part"):
                path.unlink(missing_ok=True)
            continue
        if path.is_file() and "." in path.name:
            found[path.name.rsplit(".", 1)[0]] = path
    return found


def _is_good_image(path: Path) -> bool:
    try:
        decode_check(path.read_bytes())
        return True
    except (DeadLink, OSError):
        return False


def _load_items(manifest: str | os.PathLike, fmt: str | None) -> list[ManifestItem]:
    items = load_release(manifest, fmt=fmt)
    if not any(_candidate_urls(it) for it in items):
        raise ManifestError(f"{manifest}: none of its {len(items)} items has a \"url\"; "
                            "nothing to fetch (is this the right manifest?)")
    return items


def _split_existing(items: list[ManifestItem], stems: dict[str, str],
                    images_dir: Path) -> dict[str, Path]:
    existing = _existing_images(images_dir)
    done: dict[str, Path] = {}
    for item in items:
        path = existing.get(stems[item.id])
        if path is None:
            continue
        if _is_good_image(path):
            done[item.id] = path
        else:  # only complete files are ever written here, but a user may have copied junk
            log.warning("%s does not decode; fetching it again", path)
            path.unlink(missing_ok=True)
    return done


def fetch_images(manifest: str | os.PathLike, output_dir: str | os.PathLike, *,
                 workers: int = 8, timeout: float = 10.0, retries: int = 3,
                 max_bytes: int = 20_000_000, backoff: float = 0.5, fmt: str | None = None,
                 verify_tls: bool = True, progress: bool = True) -> dict[str, Any]:
    """Fetch every item's URL into output_dir; write manifest.jsonl and fetch_report.json.

    manifest may be a memtrain manifest or any release load_release understands. Dead links
    never stop the run; they are listed in the report with a reason. Items whose image is
    already in output_dir/images are skipped, so an interrupted run can simply be rerun.
    Raises ManifestError (bad input) or MemtrainError (bad options); returns the report.
    """
    opts = FetchOptions(workers, timeout, retries, max_bytes, backoff, verify_tls)
    opts.check()
    out = Path(output_dir).expanduser().absolute()
    if Path(manifest).expanduser().absolute() == out / "manifest.jsonl":
        # the output holds only the fetched items: writing it over the input loses the rest
        raise MemtrainError(f"{manifest}: the input is this run's output manifest; pass the "
                            "original manifest (the images already fetched are kept)")
    items = _load_items(manifest, fmt)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    stems = {it.id: file_stem(it.id) for it in items}
    done = _split_existing(items, stems, images_dir)
    todo = [it for it in items if it.id not in done]
    results = _run_pool(todo, stems, images_dir, opts, progress)
    return _write_outputs(out, items, done, results)


def _run_pool(todo: list[ManifestItem], stems: dict[str, str], images_dir: Path,
              opts: FetchOptions, progress: bool) -> dict[str, tuple]:
    results: dict[str, tuple] = {}
    if not todo:
        return results
    pool = ThreadPoolExecutor(max_workers=opts.workers)
    try:
        futures = {pool.submit(_fetch_item, it, stems[it.id], images_dir, opts): it
                   for it in todo}
        with tqdm(total=len(todo), desc="fetch", unit="img", disable=not progress) as bar:
            for fut in as_completed(futures):
                results[futures[fut].id] = fut.result()
                bar.update(1)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results


def _write_outputs(out: Path, items: list[ManifestItem], done: dict[str, Path],
                   results: dict[str, tuple]) -> dict[str, Any]:
    fetched, dead = [], []
    for item in items:  # input order, whatever order the threads finished in
        if item.id in done:
            fetched.append(dataclasses.replace(item, image=str(done[item.id]),
                                               extra=dict(item.extra)))
            continue
        path, used_url, reason = results[item.id]
        if path is None:
            dead.append({"id": item.id, "url": item.url, "reason": reason})
            continue
        extra = dict(item.extra)
        if used_url != item.url:
            extra["fetched_url"] = used_url
        fetched.append(dataclasses.replace(item, image=str(path), extra=extra))
    manifest_path = write_manifest(out / "manifest.jsonl", fetched)
    report = versioned({"fetched": len(fetched), "dead": dead, "skipped_existing": len(done),
              "downloaded": len(fetched) - len(done), "total": len(items),
              "manifest": str(manifest_path)})
    atomic_write_text(out / "fetch_report.json", json.dumps(report, indent=2, ensure_ascii=False))
    return report
