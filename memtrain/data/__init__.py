"""Data in and out: the JSONL manifest, loaders for public memorized-prompt releases, and a
robust, resumable image fetcher. Importing this package needs no torch."""

from memtrain.data.fetch import FetchOptions, decode_check, download, fetch_images, file_stem
from memtrain.core.manifest import (KNOWN_KEYS, Manifest, ManifestError, ManifestItem,
                                    load_image, read_manifest, write_manifest)
from memtrain.data.releases import (FORMATS, detect_format, load_membench, load_nemo,
                                    load_prompts, load_release, load_webster, normalize_label,
                                    prompt_id)

__all__ = [
    "FORMATS", "KNOWN_KEYS", "FetchOptions", "Manifest", "ManifestError", "ManifestItem",
    "decode_check", "detect_format", "download", "fetch_images", "file_stem", "load_image",
    "load_membench", "load_nemo", "load_prompts", "load_release", "load_webster",
    "normalize_label", "prompt_id", "read_manifest", "write_manifest",
]
