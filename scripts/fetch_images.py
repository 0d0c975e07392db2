#!/usr/bin/env python
"""Download the training images behind a manifest's (or a public release's) URLs.

    python scripts/fetch_images.py MANIFEST --output_dir DIR [--workers 8] [--timeout 10]
        [--retries 3] [--max_bytes 20000000]

Writes DIR/images/, DIR/manifest.jsonl and DIR/fetch_report.json. Rerun it to resume: images
already in DIR/images are never fetched again. Exit 0 once every item was tried (dead links
are listed in the report); exit 2 with a one-line error for bad input.
"""

from __future__ import annotations

import argparse

from memtrain.core.cli import run_main
from memtrain.data.fetch import fetch_images
from memtrain.data.releases import FORMATS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("manifest", help="JSONL manifest, or a release file (see --format)")
    p.add_argument("--output_dir", required=True, help="folder for images/, manifest, report")
    p.add_argument("--workers", type=int, default=8, help="parallel downloads")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per connect/read")
    p.add_argument("--retries", type=int, default=3, help="retries for transient failures")
    p.add_argument("--max_bytes", type=int, default=20_000_000, help="largest image accepted")
    p.add_argument("--backoff", type=float, default=0.5, help="first retry delay (s), doubles")
    p.add_argument("--insecure", action="store_true",
                   help="accept invalid TLS certificates (many old image hosts)")
    p.add_argument("--format", choices=FORMATS, default=None, help="input format (auto)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


@run_main
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = fetch_images(args.manifest, args.output_dir, workers=args.workers, timeout=args.timeout,
                          retries=args.retries, max_bytes=args.max_bytes, backoff=args.backoff, fmt=args.format,
                          verify_tls=not args.insecure, progress=not args.no_progress)
    print(f"fetched {report['fetched']} of {report['total']} "
          f"({report['skipped_existing']} already present), {len(report['dead'])} dead; "
          f"manifest {report['manifest']}")


if __name__ == "__main__":
    main()
