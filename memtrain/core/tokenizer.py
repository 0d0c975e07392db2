"""A real CLIP BPE tokenizer built offline from the vocabulary that open_clip_torch ships.

SD v1.x uses OpenAI's CLIP tokenizer. Its merges file (bpe_simple_vocab_16e6.txt.gz) ships
inside the open_clip_torch wheel; we read the file without importing open_clip (which would
pull torchvision) and convert it the way OpenAI's simple tokenizer builds its vocabulary.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

from memtrain.core.errors import MemtrainError

_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_NUM_MERGES = 49152 - 256 - 2


def find_bpe_vocab() -> Path:
    """Path of the CLIP BPE merges file inside the installed open_clip_torch distribution."""
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / _BPE_FILE
            if candidate.is_file():
                return candidate
    raise MemtrainError(
        f"CLIP BPE vocabulary {_BPE_FILE} not found: install it with "
        "`pip install --no-deps open_clip_torch==3.3.0` (memtrain only reads the file)"
    )


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to 256+.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def write_clip_vocab(folder: Path) -> None:
    """Write vocab.json + merges.txt (HF format) converted from the shipped BPE file."""
    lines = gzip.open(find_bpe_vocab(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    alphabet = list(_bytes_to_unicode().values())
    vocab_list = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab_list)}))
    with open(folder / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.write("\n".join(" ".join(m) for m in merges) + "\n")


def build_clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A CLIPTokenizer with SD v1.x's ids (pad = eot = 49407 by default), saved into folder."""
    folder = Path(folder)
    if not (folder / "vocab.json").is_file():
        write_clip_vocab(folder)
    tokenizer = CLIPTokenizer.from_pretrained(
        str(folder), model_max_length=77, pad_token=pad_token,
        bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
    )
    tokenizer.save_pretrained(str(folder))
    return tokenizer


END_OF_WORD = "</w>"  # CLIP BPE's end-of-word marker


def whole_word_vocabulary(tokenizer, letters_only: bool = False) -> dict[str, int]:
    """word -> token id for a CLIP BPE tokenizer's whole-word ASCII entries (letters and digits, or
    letters only), sorted by word. ASCII only: byte-level BPE spells other bytes as letters like
    'ð', which would pass isalpha."""
    out = {}
    for token, i in tokenizer.get_vocab().items():
        word = token[: -len(END_OF_WORD)]
        if token.endswith(END_OF_WORD) and word.isascii() and (word.isalpha() if letters_only else word.isalnum()):
            out[word] = i
    return dict(sorted(out.items()))
