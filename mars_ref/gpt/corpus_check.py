"""Checking a prepared corpus before it is used (``check_corpus``, ``load_meta``, ``open_corpus``): ``meta.json``
readable and complete, each ``.bin`` a whole number of ``uint16`` with the recorded number of tokens, every id below
``vocab_size``. A damaged corpus is a ``DataError`` naming the file and the command that prepares it again."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .corpora import CORPORA, DTYPE, MAX_VOCAB, META_KEYS, CorpusMissing, DataError

FULL_CHECK_TOKENS = 1 << 28  # check_corpus reads every id of a split up to this size (512 MB), else samples
CHECK_WINDOWS, CHECK_WINDOW = 64, 1 << 20  # the sample: 64 windows of 2**20 ids, from the first to the last


def _read_json(path: Path) -> dict:
    """A JSON object, or ``{}`` if the file is unreadable."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def prepare_command(folder: str | Path, meta: dict | None = None, force: bool = True) -> str:
    """The command line that prepares the corpus in ``folder`` (again, with ``force``)."""
    import shlex

    folder = Path(folder)
    name, meta = folder.name, meta or {}
    cmd = ["python", "-m", "mars_ref.gpt.data", name]
    if folder.parent != Path("data"):
        cmd += ["--data-dir", str(folder.parent)]
    if isinstance(meta.get("local_source"), str):
        cmd += ["--source", meta["local_source"]]
    elif name not in CORPORA:
        cmd += ["--source", "PATH"]
    tok = meta.get("tokenizer")
    if tok in ("char", "gpt2") and (name not in CORPORA or tok != CORPORA[name].tokenizer):
        cmd += ["--tokenizer", tok]
    if force:
        cmd.append("--force")
    return " ".join(c if c == "PATH" else shlex.quote(c) for c in cmd)


def _max_id(tokens: np.ndarray, full: bool | None) -> tuple[int, int]:
    """``(largest id, its position)`` of a split: over every id up to ``FULL_CHECK_TOKENS`` (or with
    ``full``), else over ``CHECK_WINDOWS`` windows of ``CHECK_WINDOW`` ids from the first to the last."""
    n = len(tokens)
    window = CHECK_WINDOW
    if full or (full is None and n <= FULL_CHECK_TOKENS) or n <= CHECK_WINDOWS * window:
        starts, window = [0], n
    else:
        starts = np.linspace(0, n - window, CHECK_WINDOWS).astype(np.int64).tolist()
    best = (-1, 0)
    for start in starts:
        block = tokens[start:start + window]
        i = int(np.argmax(block))
        if int(block[i]) > best[0]:
            best = (int(block[i]), start + i)
    return best


def _check_meta(meta, meta_path: Path, folder: Path) -> None:
    """Raise ``DataError`` if ``meta`` (read from ``meta_path``) is not a complete, consistent record."""
    def bad(problem: str):
        return DataError(f"{meta_path} {problem}: the corpus is damaged or was not written by this code; "
                         f"prepare it again: {prepare_command(folder, meta if isinstance(meta, dict) else None)}")

    if not isinstance(meta, dict):
        raise bad(f"is corrupt: it holds a JSON {type(meta).__name__}, not an object")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise bad(f"lacks {missing}")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_int(meta["vocab_size"]) or not 1 <= meta["vocab_size"] <= MAX_VOCAB:
        raise bad(f"has vocab_size {meta['vocab_size']!r}: it must be an integer from 1 to {MAX_VOCAB}")
    for split in ("train", "val"):
        if not is_int(meta[f"{split}_tokens"]) or meta[f"{split}_tokens"] < 0:
            raise bad(f"has {split}_tokens {meta[f'{split}_tokens']!r}: it must be a whole number")
    if meta["dtype"] != np.dtype(DTYPE).name:
        raise bad(f"has dtype {meta['dtype']!r}: this code reads {np.dtype(DTYPE).name} only")
    if meta["tokenizer"] == "char":
        chars = meta.get("chars")
        if (not isinstance(chars, list) or len(chars) != meta["vocab_size"]
                or any(not isinstance(c, str) or len(c) != 1 for c in chars) or len(set(chars)) != len(chars)):
            raise bad(f"has no valid character vocabulary (\"chars\": {meta['vocab_size']} distinct single "
                      "characters)")
    elif meta["tokenizer"] != "gpt2":
        raise bad(f"has tokenizer {meta['tokenizer']!r}: char or gpt2")


def _check_split(folder: Path, split: str, meta: dict, full: bool | None) -> np.memmap:
    """The split's ids as a read-only memmap, once its size and ids agree with ``meta``."""
    bin_path = folder / f"{split}.bin"
    expected = meta[f"{split}_tokens"]
    redo = f"prepare it again: {prepare_command(folder, meta)}"
    if not bin_path.is_file():
        what = "is missing" if not bin_path.exists() else "is not a file"
        raise DataError(f"{bin_path} {what} (meta.json lists {expected:,} tokens): the corpus is incomplete; "
                        f"{redo}")
    try:
        size = bin_path.stat().st_size
        if size % 2:
            raise DataError(f"{bin_path} has {size:,} bytes, not a whole number of 2-byte uint16 tokens: the file "
                            f"is truncated or damaged; {redo}")
        n = size // 2
        if n != expected:
            raise DataError(f"{bin_path} has {n} tokens but meta.json says {expected}: the output is incomplete "
                            f"or corrupt; {redo}")
        if n == 0:
            raise DataError(f"{bin_path} holds no tokens: a corpus needs text in both splits; {redo}")
        tokens = np.memmap(bin_path, dtype=DTYPE, mode="r")
    except OSError as e:
        raise DataError(f"{bin_path} cannot be read ({e.strerror or e}): check its permissions, or {redo}") from e
    top, where = _max_id(tokens, full)
    if top >= meta["vocab_size"]:
        raise DataError(f"{bin_path} holds token id {top} (at position {where:,}), but the vocabulary in "
                        f"meta.json has {meta['vocab_size']} ids (0..{meta['vocab_size'] - 1}): the file is "
                        f"damaged or belongs to another corpus; {redo}")
    return tokens


def _open(path: str | Path, full: bool | None) -> tuple[dict, dict]:
    path = Path(path)
    folder = path.parent if path.name == "meta.json" else path
    meta_path = folder / "meta.json"
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{folder} is a file, not a corpus directory (one with train.bin, val.bin and "
                        f"meta.json): give the directory, or prepare one with {prepare_command(folder, force=False)}")
    if not meta_path.exists():
        raise CorpusMissing(f"{meta_path} does not exist: prepare the corpus first "
                            f"({prepare_command(folder, force=False)})")
    try:
        raw = meta_path.read_bytes()
    except OSError as e:
        raise DataError(f"{meta_path} cannot be read ({e.strerror or e}): check its permissions, or prepare "
                        f"the corpus again: {prepare_command(folder)}") from e
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{meta_path} is corrupt (not JSON: {e}): prepare it again: "
                        f"{prepare_command(folder)}") from None
    _check_meta(meta, meta_path, folder)
    splits = {split: _check_split(folder, split, meta, full) for split in ("train", "val")}
    return meta, splits


def check_corpus(path: str | Path, full: bool | None = None) -> dict:
    """Check a prepared corpus (its directory or its ``meta.json``) and return its meta dict.

    Raises ``CorpusMissing`` (a ``DataError`` and a ``FileNotFoundError``) without ``meta.json``
    and ``DataError`` (a ``ValueError``) for anything damaged: ``meta.json`` unreadable, not JSON,
    lacking keys or inconsistent; a ``.bin`` missing, of an odd number of bytes, of another length
    than recorded, empty, or holding an id ``>= vocab_size``. The message names the file and the
    command that prepares the corpus again. Every id is read (``np.argmax``, milliseconds for
    shakespeare) up to ``FULL_CHECK_TOKENS`` per split; larger splits are sampled unless ``full``.
    """
    return _open(path, full)[0]


def load_meta(path: str | Path) -> dict:
    """Read ``meta.json`` of a prepared corpus (its directory or the file), after ``check_corpus``."""
    return check_corpus(path)


def open_corpus(path: str | Path, full: bool | None = None) -> tuple[dict, dict[str, np.memmap]]:
    """``(meta, {"train": ids, "val": ids})``: the checked meta dict and the very memmaps that were
    checked (read-only ``uint16``), so what a trainer reads is what was validated."""
    return _open(path, full)
