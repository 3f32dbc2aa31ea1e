"""Fault injection for the training command, the CI-sized part of scripts/fault_injection.py (the same functions
with small counts; ``python scripts/fault_injection.py --kills 50`` is the long randomized version).

Random SIGKILLs (during start-up, training and checkpoint writes) and SIGINTs of a subprocess run, each
resumed: the finished run's losses equal the uninterrupted run's bit for bit, and every checkpoint found after a
kill holds exactly the uninterrupted run's weights of its step (a torn ``ckpt.pt.tmp`` is refused). Flipped bytes
and truncations anywhere in a checkpoint: ``CheckpointError`` naming it. A full disk during a checkpoint: exit 1,
"the disk is full", the previous checkpoint intact, no ``.tmp``. Every class of bad input: its exit status and
message, no traceback.
"""

import errno
import importlib.util
import os
import signal
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mars_ref.gpt import run_dir
from mars_ref.gpt import train as T

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fault_injection.py"
spec = importlib.util.spec_from_file_location("fault_injection", SCRIPT)
fi = sys.modules["fault_injection"] = importlib.util.module_from_spec(spec)  # (dataclasses look it up there)
spec.loader.exec_module(fi)

STEPS = 120  # ~1 s of training per launch here; each launch also spends ~2 s starting up


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return fi.make_corpus(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> tuple[Path, "fi.Reference"]:
    out = tmp_path_factory.mktemp("reference")
    return out, fi.reference_run(data_dir, out, fi.common_flags(STEPS))


def report(tally: "fi.Tally") -> None:
    print(dict(tally.counts))
    assert not tally.failures, "\n".join(tally.failures)


def test_random_sigkills_resume_on_the_same_trajectory(data_dir, reference, tmp_path):
    """3 SIGKILLs at seeded random moments (start-up, training, a checkpoint write), each resumed."""
    _, ref = reference
    tally = fi.Tally()
    fi.signal_campaign(data_dir, tmp_path, ref, fi.common_flags(STEPS), 3, np.random.default_rng(1), tally)
    report(tally)
    assert tally.counts["SIGKILLs"] == 3 and tally.counts["interrupted runs completed"] >= 1


def test_sigint_checkpoints_the_last_step_exits_130_and_resumes_on_the_same_trajectory(data_dir, reference,
                                                                                        tmp_path):
    """Ctrl-C during training: status 130, no traceback, a checkpoint of the step it names; resumed, identical."""
    _, ref = reference
    tally = fi.Tally()
    fi.signal_campaign(data_dir, tmp_path, ref, fi.common_flags(STEPS), 1, np.random.default_rng(2), tally,
                       signal.SIGINT)
    report(tally)
    assert tally.counts["SIGINTs stopped with a checkpoint"] == 1
    assert tally.counts["interrupted runs completed"] == 1


def test_flipped_bytes_and_truncations_are_refused(reference, tmp_path):
    out, _ = reference
    tally = fi.Tally()
    fi.flip_bytes(out / "ckpt.pt", tmp_path, 40, 10, np.random.default_rng(3), tally)
    report(tally)
    assert tally.counts["flipped bytes"] == 40 and tally.counts["truncations"] == 10


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(data_dir, tmp_path):
    tally = fi.Tally()
    fi.disk_full(data_dir, tmp_path, 2, np.random.default_rng(4), tally)
    report(tally)
    assert tally.counts["full disks"] == 3  # two checkpoints cut short, one metrics.jsonl append


def test_full_disk_message(data_dir, tmp_path, capsys, monkeypatch):
    """The exact message of a full disk during a checkpoint, and the previous checkpoint as it was."""
    argv = fi.train_flags(data_dir, tmp_path, "--max-iters", 2, "--eval-interval", 0)
    assert T.main(argv) == 0
    before = (tmp_path / "ckpt.pt").read_bytes()
    with fi.full_disk_in_torch_save(1000):
        assert T.main([*argv, "--resume", "--max-iters", "3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'ckpt.pt'}: the disk is full while writing a checkpoint: free some "
                          "space, or choose another --out-dir. The previous checkpoint is intact and the partial "
                          "file was removed; continue with --resume once that is fixed")
    assert (tmp_path / "ckpt.pt").read_bytes() == before and not (tmp_path / "ckpt.pt.tmp").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "ckpt.pt", "config.json", "metrics.jsonl"]


def test_every_bad_input_is_a_clear_error(data_dir, tmp_path):
    """Each class of bad input (fault_injection.bad_inputs: every number flag out of range, names, --out-dir,
    --resume conflicts, damaged or foreign checkpoints, corpora, non-finite training), in this process and two
    through the command line: the exit status and the message expected, never a traceback."""
    tally = fi.Tally()
    fi.check_bad_inputs(data_dir, tmp_path, tally, subprocesses=2)
    report(tally)
    assert tally.counts["bad inputs"] == len(fi.bad_inputs(data_dir, tmp_path)) > 80


@pytest.mark.parametrize("value, message", [
    ("0", "--batch-size must be an integer >= 1, not 0"),
    ("-3", "--batch-size must be an integer >= 1, not -3"),
])
def test_range_error_message(data_dir, tmp_path, capsys, value, message):
    assert T.main(fi.train_flags(data_dir, tmp_path, "--batch-size", value)) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_range_error_messages_name_flag_and_range():
    assert T.range_error("lr", float("inf")) == "--lr must be a finite number >= 0, not inf"
    assert T.range_error("beta2", 1.0) == "--beta2 must be a number in [0, 1), not 1.0"
    assert T.range_error("eval_interval", -1) == "--eval-interval must be an integer >= 0 (0: no evaluation), not -1"
    assert T.range_error("max_iters", 0) is None  # valid: nothing is trained
    assert T.range_error("grad_clip", 0.0) is None  # valid: no clipping
    assert T.range_error("seed", 2**63) == "--seed must be an integer >= 0 and <= 2**63 - 1, not 9223372036854775808"
    assert T.range_error("n_layer", 2.0) == "--n-layer must be an integer >= 1, not 2.0"  # the API's floats too
    assert T.range_error("warmup_iters", True) is not None


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_out_dir_is_a_clear_error(data_dir, tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    try:
        assert T.main(fi.train_flags(data_dir, folder)) == 2
    finally:
        folder.chmod(0o700)
    assert f"--out-dir {folder} cannot be written (Permission denied)" in capsys.readouterr().err


def test_read_only_out_dir_simulated(data_dir, tmp_path, capsys, monkeypatch):
    """As root can write anywhere: the same error, with mkstemp failing as on a read-only file system."""
    monkeypatch.setattr(run_dir.tempfile, "mkstemp", fi.raising(OSError(errno.EROFS, os.strerror(errno.EROFS))))
    assert T.main(fi.train_flags(data_dir, tmp_path / "out")) == 2
    assert capsys.readouterr().err == (f"error: --out-dir {tmp_path / 'out'} cannot be written (read-only file "
                                       "system): make it writable, or give another --out-dir\n")


# ----------------------------------------------------------------------------- smaller faults of the trainer


def test_an_empty_out_dir_is_refused(data_dir, tmp_path, capsys, monkeypatch):
    """``--out-dir ''`` would train into the current directory: refused, nothing written there."""
    monkeypatch.chdir(tmp_path)
    assert T.main(fi.train_flags(data_dir, "")) == 2
    assert "--out-dir '' is empty: give the run's directory" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_gamma_is_refused_for_optimizers_without_it(data_dir, tmp_path, capsys):
    """``--gamma`` is refused for a non-MARS optimizer, as ``--exact`` is; 0 (no correction) is accepted."""
    assert T.main(fi.train_flags(data_dir, tmp_path, "--optimizer", "lion", "--gamma", "0.1")) == 2
    assert capsys.readouterr().err.startswith("error: --gamma is a MARS option; optimizer 'lion' has no ")
    assert not any(tmp_path.iterdir())
    assert T.resolve(T.TrainConfig(optimizer="lion", gamma=0.0)).gamma == 0.0
    assert T.resolve(T.TrainConfig(optimizer="mars-lion", gamma=0.1)).gamma == 0.1


def test_messages_name_the_dashed_flags():
    for cfg in (T.TrainConfig(step_impl="fast"), T.TrainConfig(optimizer="adamw", step_impl="foreach")):
        with pytest.raises(T.ConfigError, match="--step-impl") as e:
            T.resolve(cfg)
        assert "step_impl" not in str(e.value)


def test_a_full_disk_at_the_first_checkpoint_does_not_promise_a_previous_one(data_dir, tmp_path, capsys):
    with fi.full_disk_in_torch_save(1000):
        assert T.main(fi.train_flags(data_dir, tmp_path, "--max-iters", 2, "--eval-interval", 0)) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'ckpt.pt'}: the disk is full while writing a checkpoint: free some "
                          "space, or choose another --out-dir. No checkpoint of this run exists yet and the partial "
                          "file was removed; start the run again once that is fixed")
    assert "previous checkpoint" not in err
    assert not (tmp_path / "ckpt.pt").exists() and not (tmp_path / "ckpt.pt.tmp").exists()


def test_resuming_a_finished_run_reports_its_last_losses(data_dir, tmp_path, capsys):
    argv = fi.train_flags(data_dir, tmp_path, "--max-iters", 4, "--eval-interval", 2, "--log-interval", 1)
    first = T.train(*T.parse_args(argv))
    capsys.readouterr()
    again = T.train(*T.parse_args([*argv, "--resume"]))
    out = capsys.readouterr().out
    assert (again["val_loss"], again["train_loss"]) == (first["val_loss"], first["train_loss"]) != (None, None)
    assert f"done: 4 steps, val loss {first['val_loss']}," in out and "val loss None" not in out


def test_a_damaged_meta_json_of_a_corpus_of_your_own_is_named(data_dir, tmp_path, capsys):
    corpus = tmp_path / "data"
    fi.make_corpus(corpus)
    (corpus / "tiny" / "meta.json").write_text("{not json")
    assert T.main(fi.train_flags(corpus, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert f"{corpus / 'tiny' / 'meta.json'} is corrupt (not JSON" in err and "unknown corpus" not in err


def test_micro_batches_that_cannot_fit_in_memory_are_refused(data_dir, tmp_path, capsys, monkeypatch):
    """``--batch-size 100000`` of a 4 × 128 model (hundreds of GiB of activations): refused before the model is built,
    naming the estimate; ``--block-size 100000`` likewise (``check_memory``, here with 16 GiB of memory)."""
    from mars_ref.gpt import devices

    argv = fi.train_flags(data_dir, tmp_path, "--n-layer", 4, "--n-head", 4, "--n-embd", 128, "--block-size", 128,
                          "--batch-size", 100_000)
    assert T.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --batch-size 100000 × --block-size 128 cannot fit: one micro-batch of this model "
                          "(4 layers × 128, vocabulary ")
    assert "GiB" in err and "lower --batch-size" in err
    monkeypatch.setattr(devices, "device_memory", lambda device: (16 * 2**30, "this machine's memory"))
    default = T.resolve(T.TrainConfig(device="cpu"))
    long = T.resolve(T.TrainConfig(block_size=100_000, device="cpu"))
    for cfg in (default, long):
        model_cfg = T.model_config(cfg, {"vocab_size": 65})
        if cfg is default:  # the CPU demo: well below a GiB
            assert devices.training_memory(cfg, model_cfg, autocast_bf16=False) < 2**30
            devices.check_memory(cfg, model_cfg, "cpu", autocast_bf16=False)
        else:
            with pytest.raises(T.ConfigError, match="--block-size 100000 cannot fit"):
                devices.check_memory(cfg, model_cfg, "cpu", autocast_bf16=False)


# ----------------------------------------------------------------------------- GPU paths, checked on the CPU


def test_the_fused_step_is_refused_on_a_gpu(data_dir, tmp_path, capsys):
    """The fused step is C loops over CPU memory: refused at configuration for a CUDA device, exit 2."""
    for device in ("cuda", "cuda:1", "mps"):
        with pytest.raises(T.ConfigError, match=f"--step-impl fused runs MARS's step as C loops on the CPU; on "
                                                f"--device {device} use --step-impl foreach"):
            T.resolve(T.TrainConfig(step_impl="fused", device=device))
    assert T.resolve(T.TrainConfig(step_impl="fused", device="cpu")).step_impl == "fused"
    assert T.main(fi.train_flags(data_dir, tmp_path, "--step-impl", "fused", "--device", "cuda")) == 2
    assert "--step-impl fused runs MARS's step as C loops on the CPU" in capsys.readouterr().err


def test_under_ddp_the_stop_flag_is_all_reduced_every_log_interval_only(monkeypatch):
    """The stop request is a collective with a device synchronisation: under DDP only every ``log_interval`` steps
    and at the last step; in one process it is read every step, without a collective."""
    from types import SimpleNamespace

    from mars_ref.gpt import signals

    reduced = []
    monkeypatch.setattr(signals.dist, "all_reduce", lambda tensor, op=None: reduced.append(tensor))
    cfg = SimpleNamespace(log_interval=10, max_iters=35)
    ddp = SimpleNamespace(d=SimpleNamespace(world=2), cfg=cfg, device="cpu", stop_signal=None, step=0)
    assert not any(signals.stop_requested(ddp, done) for done in range(1, 36))
    assert len(reduced) == 4  # steps 10, 20, 30 and 35
    ddp.step, ddp.stop_signal = 11, 15
    assert signals.next_stop_step(ddp) == 20 and signals.stop_requested(ddp, 20)
    one = SimpleNamespace(d=SimpleNamespace(world=1), cfg=cfg, device="cpu", stop_signal=15, step=11)
    assert signals.next_stop_step(one) == 12 and signals.stop_requested(one, 12) and len(reduced) == 5


def test_the_logits_are_freed_before_the_backward_pass(data_dir, tmp_path):
    """The training step keeps no reference to the (batch × block × vocab) logits through the backward pass."""
    import weakref

    from mars_ref.gpt.model import GPT

    alive = []

    def hook(module, inputs, output):
        if isinstance(module, GPT) and torch.is_grad_enabled() and output[1] is not None:
            logits = weakref.ref(output[0])
            output[1].register_hook(lambda grad: alive.append(logits() is not None))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        assert T.main(fi.train_flags(data_dir, tmp_path, "--max-iters", 2, "--eval-interval", 0,
                                     "--grad-accum", 2)) == 0
    finally:
        handle.remove()
    assert alive == [False] * 4


def test_the_corpus_is_memory_mapped_anew_for_every_batch(data_dir, monkeypatch):
    from mars_ref.gpt import batches

    opened = []
    real = batches.np.memmap
    monkeypatch.setattr(batches.np, "memmap", lambda *a, **k: opened.append(a[0]) or real(*a, **k))
    source = batches.Batches(data_dir / "tiny", seed=0, block_size=32, batch_size=4, device="cpu")
    first = source.get("train", 0, 5, 0)
    n = len(opened)
    again = source.get("train", 0, 5, 0)
    source.get("val", 1, 0, 0)
    assert len(opened) == n + 2 and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_a_gpu_that_emulates_bfloat16_trains_in_float32(monkeypatch, capsys):
    """``--dtype auto`` on CUDA: bf16 autocast only where the GPU computes bfloat16 natively; a GPU that emulates it
    (``is_bf16_supported()`` is True there, ``including_emulation=False`` is not) trains in float32, with a note."""
    from contextlib import nullcontext

    from mars_ref.gpt import devices

    native = {"value": False}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or native["value"])
    assert isinstance(devices.autocast_context("cuda:0", "auto"), nullcontext)
    assert "emulates bfloat16" in capsys.readouterr().err
    native["value"] = True
    with warnings.catch_warnings():  # without a GPU torch warns that it disables the autocast
        warnings.simplefilter("ignore")
        context = devices.autocast_context("cuda:0", "auto")
    assert isinstance(context, torch.autocast) and context.fast_dtype == torch.bfloat16
    assert isinstance(devices.autocast_context("cpu", "auto"), nullcontext)


def test_tf32_on_cuda_by_default_and_a_flag_turns_it_off(monkeypatch):
    from mars_ref.gpt import devices

    calls = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", calls.append)
    devices.set_matmul_precision("cuda:0", True)
    devices.set_matmul_precision("cuda", False)
    devices.set_matmul_precision("cpu", True)  # the CPU's matrix products stay as they are
    assert calls == ["high", "highest"]
    assert T.parse_args([])[0].tf32 is True and T.parse_args(["--no-tf32"])[0].tf32 is False
    assert "tf32" in T.RESUMABLE


def test_under_torchrun_an_unprepared_corpus_is_refused_with_the_command_to_prepare_it(tmp_path, monkeypatch):
    """Preparing a corpus while the other processes wait would outlast NCCL's timeout: every process only checks
    it, and one that is not prepared is a ConfigError with the command to run first."""
    from mars_ref.gpt import batches, devices

    monkeypatch.setattr(batches.data, "prepare", fi.raising(AssertionError("prepared under torchrun")))
    cfg = T.resolve(T.TrainConfig(dataset="tinyshakespeare", data_dir=str(tmp_path)))
    with pytest.raises(T.ConfigError) as e:
        batches.prepare_data(cfg, devices.Dist(rank=1, local_rank=1, world=2))
    assert str(e.value) == (f"--dataset tinyshakespeare is not prepared in --data-dir {tmp_path}: under torchrun "
                            "prepare it first, in one process: python -m mars_ref.gpt.data tinyshakespeare "
                            f"--data-dir {tmp_path} (a corpus of your own: add --source PATH)")
