"""Document corpora (OpenWebText, FineWeb-Edu, your own ``.jsonl``/``.txt``/``.parquet`` files): GPT-2 ids with
``<|endoftext|>`` after each document, 0.05% of the documents (seed 2357) as validation, as nanoGPT's
``prepare.py``; through ``datasets`` from the Hub, and through a plain reader from a local source without it."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from .corpora import (
    DOC_SPLIT_SEED,
    DOC_VAL_FRACTION,
    DOCUMENT_SUFFIXES,
    Corpus,
    DataError,
    decode_utf8,
    to_uint16,
    write_bin,
)
from .tokenizers import GPT2Tokenizer


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
