"""Reliability: nothing lost, nothing executed, every bad input and fault gets a clear answer.

Each test is one case of the reliability issue; the oracle is the exit code and message, the
files left behind, or weights equal (bitwise, on the CPU) to an uninterrupted run's.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from sstl.cli.main import app
from sstl.engine import pretrain as pretrain_mod
from sstl.engine.finetune import finetune
from sstl.engine.pretrain import pretrain
from sstl.engine.runs import Run

from .configs import finetune_cfg, pretrain_cfg

FAST = ["--arch", "resnet18", "--init", "random", "--device", "cpu", "--no-compile"]
BAD = [
    ("pretrain", ["--epochs", "0"], "--epochs must be at least 1"),
    ("pretrain", ["--epochs", "-1"], "--epochs must be at least 1"),
    ("pretrain", ["--batch-size", "0"], "--batch-size must be at least"),
    ("pretrain", ["--batch-size", "-4"], "--batch-size must be at least"),
    ("pretrain", ["--batch-size", "1"], "--batch-size must be at least 2"),
    ("pretrain", ["--view-size", "0"], "--view-size must be at least 32"),
    ("pretrain", ["--checkpoint-every", "-1"], "--checkpoint-every must be >= 0"),
    ("pretrain", ["--checkpoint-minutes", "0"], "--checkpoint-minutes must be positive"),
    ("pretrain", ["--log-every", "0"], "--log-every must be at least 1"),
    ("pretrain", ["--lr", "0"], "--lr must be positive"),
    ("pretrain", ["--tau", "1.5"], "--tau must be in [0, 1)"),
    ("pretrain", ["--method", "moco"], "--method must be one of"),
    ("pretrain", ["--method", "simclr", "--temperature", "0"], "--temperature must be positive"),
    ("pretrain", ["--method-option", "nonsense=1"], "has no setting 'nonsense'"),
    # 0 means "the feature dimension" for SimCLR only; Cross's MLP crashed on it mid-run
    ("pretrain", ["--method-option", "proj_hidden=0"], "proj-hidden must be positive, not 0"),
    ("pretrain", ["--method", "simclr", "--method-option", "proj_hidden=-1"],
     "proj-hidden must be at least 0, not -1"),
    ("pretrain", ["--name", "../escape"], "--name '../escape'"),
    ("pretrain", ["--test-fraction", "0"], "--test-fraction must be between 0 and 1"),
    ("finetune", ["--test-fraction", "1"], "--test-fraction must be between 0 and 1"),
    ("finetune", ["--batch-size", "-4"], "--batch-size must be at least 2"),
    ("finetune", ["--batch-size", "1"], "--batch-size must be at least 2"),
    ("pretrain", ["--cache-dir", __file__], "--cache-dir"),
    ("pretrain", ["--method-option", "tau=0.9", "--tau", "0.5"], "tau is given twice"),
    ("finetune", ["--epochs", "0"], "--epochs must be at least 1"),
    ("finetune", ["--fraction", "0"], "--fraction must be in (0, 1]"),
    ("finetune", ["--image-size", "0"], "--image-size must be at least 32"),
    ("finetune", ["--summary-last", "0"], "--summary-last must be at least 1"),
    ("finetune", ["--seed", str(2 ** 63)], "--seed must be in [0, 2**63)"),
    ("pretrain", ["--split-seed", "-1"], "--split-seed must be in [0, 2**63)"),
]


@pytest.mark.parametrize("command,args,message", BAD, ids=[" ".join(a) for _, a, _ in BAD])
def test_bad_values_exit_nonzero_with_one_line(command, args, message, tmp_path):
    r = CliRunner().invoke(app, [command, *FAST, "--out", str(tmp_path), *args])
    assert r.exit_code not in (0, None), r.output
    assert isinstance(r.exception, SystemExit), r.exception  # a message, not a traceback
    assert message in r.output, r.output
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


BAD_TOOLS = [
    (["bench", "--batch-size", "0"], "--batch-size must be at least 2"),  # was: the default
    (["bench", "--steps", "0"], "--steps must be at least 1"),  # was: the default
    (["bench", "--what", "speed"], "--what must be step, data, kernels or all"),
    (["bench", "--view-size", "8"], "--view-size must be at least 32"),
    (["bench", "--arch", "resnet9"], "--arch must be resnet18 or resnet50"),
    (["bench", "--json", "{tmp}"], "is a folder; name a file"),
    (["export", "--model", "{tmp}/run", "--out", "{tmp}/model.json"], "name a .onnx file"),
    (["export", "--model", "{tmp}/run", "--out", "{tmp}"], "is a folder"),
    (["export", "--model", "{tmp}/run", "--format", "tflite"], "--format must be onnx"),
    (["export", "--model", "{tmp}/run", "--tolerance", "nan"], "--tolerance must be >= 0"),
    (["cache", "--other-versions"], "--other-versions goes with --prune"),
    (["cache", "--cache-dir", "{tmp}/none"], "is not a folder"),
]


@pytest.mark.parametrize("args,message", BAD_TOOLS, ids=[" ".join(a) for a, _ in BAD_TOOLS])
def test_bad_values_of_bench_export_and_cache_are_refused_before_any_work(
        args, message, tmp_path, monkeypatch):
    """The tools' configs go through config.check() too: one line, before any benchmark,
    export or cache listing starts (each is replaced here by a call that fails the test)."""
    from sstl.benchmarks import data as data_bench, kernels, step
    from sstl.engine import export
    from sstl.engine.data import cachedir

    def started(*a, **k):
        raise AssertionError("work began before the values were checked")
    for module, name in ((step, "run"), (data_bench, "run"), (kernels, "run"),
                         (export, "export_onnx"), (cachedir, "entries"), (cachedir, "prune")):
        monkeypatch.setattr(module, name, started)
    r = CliRunner().invoke(app, [a.format(tmp=tmp_path) for a in args])
    assert isinstance(r.exception, SystemExit) and r.exit_code not in (0, None), r.output
    assert message in r.output, r.output
    assert list(tmp_path.iterdir()) == []


def test_bench_json_replaces_only_an_earlier_bench_result(tmp_path, monkeypatch):
    from sstl.benchmarks import kernels

    monkeypatch.setattr(kernels, "run", lambda **kw: {"rows": []})
    monkeypatch.setattr(kernels, "print_report", lambda r: None)
    mine = tmp_path / "notes.json"
    mine.write_text('{"my": "notes"}')
    r = CliRunner().invoke(app, ["bench", "--what", "kernels", "--json", str(mine)])
    assert r.exit_code not in (0, None) and "is not an earlier `sstl bench` result" in r.output
    assert mine.read_text() == '{"my": "notes"}'
    ours = tmp_path / "bench.json"
    for _ in range(2):  # written, then replaced
        r = CliRunner().invoke(app, ["bench", "--what", "kernels", "--json", str(ours)])
        assert r.exit_code == 0, r.output
    assert json.loads(ours.read_text()) == {"kernels": {"rows": []}}


def test_one_class_data_is_refused_for_finetuning(tmp_path):
    from .tiny_run import write_pngs

    write_pngs(tmp_path / "d" / "COVID", n=6)
    with pytest.raises(SystemExit, match="one class"):
        finetune(finetune_cfg(path=tmp_path / "d", out=str(tmp_path), name="x",
                              positive_class="COVID"))
    assert not (tmp_path / "x").exists()


def test_an_abort_says_what_it_kept(tmp_path, capsys):
    """Ctrl-C twice raises KeyboardInterrupt: before the first checkpoint the new run's
    folder goes, with one line saying so; after one, the folder and checkpoint stay."""
    with pytest.raises(KeyboardInterrupt):
        with Run.open(str(tmp_path), "r"):
            raise KeyboardInterrupt
    assert not (tmp_path / "r").exists()
    assert "aborted before the first checkpoint: nothing was kept" in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):
        with Run.open(str(tmp_path), "r") as run:
            run.save({"step": 1})  # written on a thread: the abort waits for it
            raise KeyboardInterrupt
    assert (tmp_path / "r" / "checkpoint.pt").exists()
    assert "keeps its last checkpoint" in capsys.readouterr().err


def test_a_run_whose_log_reader_went_away_finishes(tmp_path):
    """`sstl pretrain 2>&1 | head`: once head exits, every line meets a closed pipe. Rich's
    default answer is exit status 1, which lost the run (before its first checkpoint, its
    folder too), or, from finetune's summary table on stdout, the exit status and with it a
    grid's later cells; the commands now go on unheard and finish."""
    env = {**os.environ, "SSTL_CACHE": str(tmp_path / "cache")}
    small = ["--arch", "resnet18", "--init", "random", "--epochs", "1", "--batch-size", "64",
             "--device", "cpu", "--no-compile", "--out", str(tmp_path / "runs")]
    for command, args, made in (("pretrain", ["--view-size", "32", "--name", "p"], "p/encoder"),
                                ("finetune", ["--image-size", "32", "--name", "f"], "f/model")):
        r, w = os.pipe()
        os.close(r)  # the reader is gone before the first line
        done = subprocess.run([sys.executable, "-m", "sstl.cli.main", command, *small, *args],
                              stdout=w, stderr=w, env=env, timeout=600)
        os.close(w)
        assert done.returncode == 0, command
        assert (tmp_path / "runs" / f"{made}.safetensors").exists()


def test_a_full_disk_names_the_checkpoint_that_filled_it(tmp_path, monkeypatch):
    """The checkpoint (hundreds of MB, written on a thread) fills the disk; a small file the
    main thread writes next fails too. The error names the checkpoint first."""
    import errno

    from sstl.engine import runs
    from sstl.engine.io import WriteError, save_json

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(runs.torch, "save", full)
    with pytest.raises(WriteError) as e:
        with Run.open(str(tmp_path), "r") as run:
            run.save({"step": 1})
            run._writer.join()  # the checkpoint has failed before the next write
            monkeypatch.setattr(runs.os, "replace", full)
            save_json({}, run.path / "timing.json")
    msg = str(e.value)
    assert msg.startswith(f"could not write {tmp_path / 'r' / 'checkpoint.next.pt'}: No space")
    assert "; then could not write" in msg and msg.index("checkpoint") < msg.index("timing.json")


def test_a_checkpoint_without_a_resume_key_is_refused(tmp_path):
    """A checkpoint that names no settings (cut by hand, or another tool's) is never taken
    for this run's."""
    from sstl.engine.runs import CHECKPOINT_FORMAT

    with Run.open(str(tmp_path), "r") as run:
        torch.save({"format": CHECKPOINT_FORMAT, "epoch": 1}, run.checkpoint)
        with pytest.raises(SystemExit, match="different settings"):
            run.resume(("a-key",), "")


def test_a_run_directory_is_locked(tmp_path):
    with Run.open(str(tmp_path), "r"):
        with pytest.raises(SystemExit, match=f"in use by another sstl process \\(pid {os.getpid()}"):
            with Run.open(str(tmp_path), "r"):
                pass
    with Run.open(str(tmp_path), "r"):  # released at the end
        pass


def test_a_run_failing_before_its_first_checkpoint_leaves_no_directory(tmp_path):
    with pytest.raises(SystemExit, match="fewer than one batch"):
        pretrain(pretrain_cfg(out=str(tmp_path), name="big", batch_size=4096))
    assert not (tmp_path / "big").exists()


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {MARK}",))


MARK = "/tmp/sstl-test-pickle-ran"


def test_a_crafted_checkpoint_never_runs_code(tmp_path):
    if os.path.exists(MARK):
        os.remove(MARK)
    run = tmp_path / "r"
    run.mkdir()
    with open(run / "checkpoint.pt", "wb") as fh:
        pickle.dump({"format": 2, "x": Exploit()}, fh)
    with pytest.raises(SystemExit, match="no readable checkpoint"):
        pretrain(pretrain_cfg(out=str(tmp_path), name="r"))
    assert not os.path.exists(MARK)
    with pytest.raises(SystemExit, match="not a readable state dict"):  # --init too
        pretrain(pretrain_cfg(out=str(tmp_path), name="s", init=str(run / "checkpoint.pt")))
    assert not os.path.exists(MARK)


def _two_epochs(tmp_path, name, **kw):
    return pretrain_cfg(out=str(tmp_path), name=name, epochs=2, checkpoint_every=2, **kw)


def _same_weights(a, b):
    sa, sb = load_file(a / "encoder.safetensors"), load_file(b / "encoder.safetensors")
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_weights_files_are_byte_for_byte_the_same_for_the_same_state(tmp_path):
    """safetensors writes its header's metadata in hash-map order (a new order per call, the
    precondition checked here); save_weights sorts it, and the file still reads back whole."""
    from safetensors import safe_open
    from safetensors.torch import save

    from sstl.engine.record import save_weights

    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3, dtype=torch.bfloat16)}
    meta = {f"k{i}": i for i in range(12)} | {"trained_on": ["x"]}
    header = {k: str(v) for k, v in meta.items() if k != "trained_on"}
    assert len({save(state, metadata=header) for _ in range(6)}) > 1
    blobs = set()
    for i in range(6):
        save_weights(state, tmp_path / f"w{i}.safetensors", meta)
        blobs.add((tmp_path / f"w{i}.safetensors").read_bytes())
    assert len(blobs) == 1
    back = load_file(tmp_path / "w0.safetensors")
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    with safe_open(tmp_path / "w0.safetensors", "pt") as f:
        assert f.metadata() == header


def test_a_rerun_finished_start_leaves_the_runs_made_from_it_resumable(tmp_path):
    """A finished pretraining rerun rewrites encoder.safetensors and its sidecar: with the
    same bytes, also when only how it runs changed (--log-every, --checkpoint-minutes), so
    fine-tuning runs made from that file (--init PATH, keyed by its digest; --encoder, keyed
    by its sidecar) continue."""
    pre = pretrain(pretrain_cfg(out=str(tmp_path), name="pre"))
    before = [(pre / f).read_bytes() for f in ("encoder.safetensors", "encoder.json")]
    ft = finetune_cfg(out=str(tmp_path), name="ft", init=str(pre / "encoder.safetensors"))
    fe = finetune_cfg(out=str(tmp_path), name="fe", encoder=str(pre))
    finetune(ft)
    finetune(fe)
    pretrain(pretrain_cfg(out=str(tmp_path), name="pre", log_every=3, checkpoint_minutes=7))
    assert [(pre / f).read_bytes() for f in ("encoder.safetensors", "encoder.json")] == before
    finetune(ft)  # refused before: "the --init file changed since"
    finetune(fe)  # refused before: "the --encoder file changed since"


def test_a_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, monkeypatch):
    """Where the run starts is decided once, before anything is written: each checkpoint file
    is read once, and the unreadable one is said once."""
    from sstl.engine import runs

    full = pretrain(_two_epochs(tmp_path, "full"))
    run = pretrain(_two_epochs(tmp_path, "cut"))
    assert (run / "checkpoint.prev.pt").exists()
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    (run / "encoder.safetensors").unlink()
    capsys.readouterr()
    loads, load = [], runs.torch.load
    monkeypatch.setattr(runs.torch, "load", lambda f, *a, **k: loads.append(f) or load(f, *a, **k))
    pretrain(_two_epochs(tmp_path, "cut"))
    err = capsys.readouterr().err
    assert "resuming from checkpoint.prev.pt" in err and err.count("cannot be read") == 1
    assert loads == [run / "checkpoint.prev.pt"]  # checkpoint.pt fails its CRCs before a load
    assert _same_weights(full, run)


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    """One flipped byte inside a tensor: torch.load reads it without complaint (checked here),
    so resume checks the archive's CRCs and takes checkpoint.prev.pt instead."""
    full = pretrain(_two_epochs(tmp_path, "full"))
    run = pretrain(_two_epochs(tmp_path, "flip"))
    data = bytearray((run / "checkpoint.pt").read_bytes())
    data[len(data) // 2] ^= 0x10  # the middle of the file: tensor bytes (weights dominate)
    (run / "checkpoint.pt").write_bytes(bytes(data))
    torch.load(run / "checkpoint.pt", weights_only=True)  # the precondition: loads silently
    (run / "encoder.safetensors").unlink()
    pretrain(_two_epochs(tmp_path, "flip"))
    said = capsys.readouterr().err
    assert "fails its checksum" in said and "resuming from checkpoint.prev.pt" in said
    assert _same_weights(full, run)


def test_a_rotation_cut_by_a_kill_resumes_from_the_newest_checkpoint(tmp_path, capsys):
    """SIGKILL between the writer's two renames leaves checkpoint.next.pt (complete: renamed
    into place once written) and no checkpoint.pt; a kill mid-write leaves a temporary. The
    next run finishes the rotation, deletes the temporary, and resumes from the newest."""
    run = pretrain(_two_epochs(tmp_path, "cut"))
    os.replace(run / "checkpoint.pt", run / "checkpoint.next.pt")
    (run / ".checkpoint.next.pt.tmp99999999").write_bytes(b"x" * 1000)
    pretrain(_two_epochs(tmp_path, "cut"))
    assert "has finished its 2 epochs" in capsys.readouterr().err  # not the older prev
    assert sorted(p.name for p in run.glob("*checkpoint*")) == ["checkpoint.prev.pt",
                                                                "checkpoint.pt"]


def test_no_resume_discards_the_old_checkpoints_at_once(tmp_path, monkeypatch, capsys):
    """--no-resume clears metrics.csv at once; the old checkpoints must go with it, or a new
    run stopped before its first save would pass for the old, finished one."""
    cfg = pretrain_cfg(out=str(tmp_path), name="over")
    run = pretrain(cfg)

    def stopped(self, state):
        raise KeyboardInterrupt

    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr(Run, "save", stopped)
        with pytest.raises(KeyboardInterrupt):
            pretrain(dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime,
                                                                          resume=False)))
    said = capsys.readouterr().err  # work is deleted: the user is told what went
    assert f"--no-resume: starting {run} over; the earlier run's checkpoint.pt, " \
           "encoder.safetensors, encoder.json, metrics.csv removed" in said, said
    assert not list(run.glob("checkpoint*"))
    # Nor may the old run's weights or history pass for this one's: finetune would take the
    # encoder, and timing.json would add the old sessions to this run's time.
    assert not list(run.glob("encoder.*"))
    assert json.loads((run / "config.json").read_text())["earlier_commands"] == []
    capsys.readouterr()
    pretrain(cfg)
    assert "nothing to train" not in capsys.readouterr().err  # trained again, from the start
    assert json.loads((run / "timing.json").read_text())["sessions"] == 2  # the aborted one


def test_no_resume_never_clears_the_folder_the_command_reads_its_start_from(tmp_path):
    """Found by a user: `finetune --encoder runs/p --name p` was refused as 'different
    settings, or --no-resume to start over here', and --no-resume then deleted the encoder it
    was about to fine-tune from. A folder of another command is refused either way, and a
    start inside the folder --no-resume would clear is refused before anything goes."""
    pre = pretrain(pretrain_cfg(out=str(tmp_path), name="p"))
    kept = sorted(f.name for f in pre.iterdir())
    for resume in (True, False):
        with pytest.raises(SystemExit, match="holds an `sstl pretrain` run; give this "
                                             "`sstl finetune` run another --name"):
            finetune(finetune_cfg(out=str(tmp_path), name="p", encoder=str(pre), resume=resume))
        assert sorted(f.name for f in pre.iterdir()) == kept
    # Same command: a pretraining started from a file inside its own folder.
    start = pre / "encoder.safetensors"
    cfg = pretrain_cfg(out=str(tmp_path), name="p", init=str(start), resume=False)
    with pytest.raises(SystemExit, match=f"--init {start} is in {pre}, which --no-resume "
                                         "would clear"):
        pretrain(cfg)
    assert sorted(f.name for f in pre.iterdir()) == kept
    # A file of the user's there, which --no-resume does not delete, is a start like any.
    shutil.copy(start, pre / "mine.safetensors")
    pretrain(dataclasses.replace(cfg, init=str(pre / "mine.safetensors")))
    assert (pre / "mine.safetensors").is_file() and (pre / "encoder.safetensors").is_file()


def test_an_interrupted_session_keeps_its_wall_time(tmp_path, monkeypatch):
    cfg = _two_epochs(tmp_path, "int")
    real, calls = Run.save, []

    def stop_after_second(self, state):
        real(self, state)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Run, "save", stop_after_second)
        with pytest.raises(KeyboardInterrupt):
            pretrain(cfg)
    first = json.loads((tmp_path / "int" / "timing.json").read_text())
    assert first["total"] > 0 and first["total_all_sessions"] == first["total"]
    pretrain(cfg)
    again = json.loads((tmp_path / "int" / "timing.json").read_text())
    assert again["sessions"] == 2
    assert again["total_all_sessions"] == pytest.approx(first["total"] + again["total"], abs=2e-3)


def test_the_final_weights_always_match_the_final_checkpoint(tmp_path, monkeypatch):
    real = pretrain_mod.save_encoder

    def killed_before_the_encoder(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain_mod, "save_encoder", killed_before_the_encoder)
    with pytest.raises(KeyboardInterrupt):
        pretrain(_two_epochs(tmp_path, "r"))
    monkeypatch.setattr(pretrain_mod, "save_encoder", real)
    run = pretrain(_two_epochs(tmp_path, "r"))  # finds the finished checkpoint: writes, no training
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    enc = load_file(run / "encoder.safetensors")
    assert ck["epoch"] == 2 and all(torch.equal(ck["model"][f"backbone.{k}"], v)
                                    for k, v in enc.items())


def test_a_full_disk_is_one_message_and_leaves_no_partial_file(tmp_path, monkeypatch):
    def no_space(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(SystemExit, match="No space left on device"):
        pretrain(pretrain_cfg(out=str(tmp_path), name="full", checkpoint_every=1))
    leftovers = [p for p in tmp_path.rglob("*") if ".tmp" in p.name or p.name.endswith(".next.pt")]
    assert leftovers == []
    monkeypatch.undo()
    assert (pretrain(pretrain_cfg(out=str(tmp_path), name="full")) / "encoder.safetensors").exists()


def test_an_unwritable_out_is_one_message(tmp_path):
    (tmp_path / "file").write_text("")
    r = CliRunner().invoke(app, ["pretrain", *FAST, "--out", str(tmp_path / "file" / "runs")])
    assert r.exit_code not in (0, None) and isinstance(r.exception, SystemExit)
    assert "a file is in the way of that folder" in r.output  # check(), before any work
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_weights_are_world_readable_and_a_model_works_as_init(tmp_path):
    old = os.umask(0o077)  # a strict umask must not make weights private while sidecars are not
    try:
        run = finetune(finetune_cfg(out=str(tmp_path), name="ft"))
    finally:
        os.umask(old)
    for f in ("model.safetensors", "model.json"):
        assert (run / f).stat().st_mode & 0o777 == 0o644, f
    again = finetune(finetune_cfg(out=str(tmp_path), name="ft2", init=str(run / "model.safetensors")))
    assert (again / "model.safetensors").exists()


def test_wrong_architecture_encoder_is_reported_as_the_encoder(tmp_path):
    enc = pretrain(pretrain_cfg(out=str(tmp_path), name="enc"))
    meta = (enc / "encoder.json").read_text().replace('"resnet18"', '"resnet50"')
    (enc / "encoder.json").write_text(meta)  # a sidecar that lies about the weights
    with pytest.raises(SystemExit, match=r"^--encoder .* does not fit"):
        finetune(finetune_cfg(out=str(tmp_path), name="ft", encoder=str(enc), arch="resnet50"))


@pytest.mark.slow
def test_sigkill_at_random_moments_then_rerun_equals_an_uninterrupted_run(tmp_path):
    """Real processes killed with SIGKILL (nothing runs after it), twice, then run to the end."""
    args = [sys.executable, "-m", "sstl.cli.main", "pretrain", *FAST, "--epochs", "2",
            "--batch-size", "32", "--view-size", "32", "--cache-size", "64",
            "--checkpoint-every", "1", "--log-every", "1", "--method-option", "proj_hidden=64",
            "--method-option", "pred_hidden=64", "--out", str(tmp_path), "--name", "killed"]
    env = {**os.environ, "SSTL_PLAIN_LOG": "1"}
    rng = random.Random(0)
    run = tmp_path / "killed"
    for _ in range(2):
        p = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 240
        seen = run / "checkpoint.pt"
        start = seen.stat().st_mtime_ns if seen.exists() else 0
        while time.monotonic() < deadline and p.poll() is None:  # wait for a new checkpoint
            if seen.exists() and seen.stat().st_mtime_ns != start:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 0.5))  # then a random moment: mid-step, mid-write...
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    full = pretrain(pretrain_cfg(out=str(tmp_path), name="full", epochs=2, cache_size=64,
                                 settings={"proj_hidden": 64, "pred_hidden": 64, "proj_dim": 128}))
    assert _same_weights(full, run)


def test_startup_is_the_process_age_at_the_first_run_only():
    """timing.json's startup: from the process's start (Python, imports, CUDA) to its first
    run directory; a later run of the same process (sstl reproduce) records none."""
    code = ("import time; time.sleep(0.6); from sstl.engine.runs import _startup_seconds as s; "
            "print(s(), s())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    first, second = out.stdout.split()
    assert 0.6 <= float(first) < 60 and second == "None", out.stdout


def test_checkpoint_every_counts_steps_across_epochs(tmp_path, monkeypatch):
    """6 steps an epoch, --checkpoint-every 4: global steps 4 and 8 (epoch 2, step 2), then
    the end. Counting within each epoch would save at step 4 of every epoch instead."""
    from sstl.engine.runs import Run

    saved, real = [], Run.save
    monkeypatch.setattr(Run, "save", lambda self, ck: (saved.append((ck["epoch"], ck["step"])),
                                                      real(self, ck))[1])
    pretrain(pretrain_cfg(out=str(tmp_path), name="r", epochs=2, checkpoint_every=4,
                          checkpoint_minutes=1e6))
    assert saved == [(0, 4), (1, 2), (2, 0)]


def test_a_diverging_run_stops_without_checkpointing_nan(tmp_path):
    with pytest.raises(SystemExit, match=r"training diverged .*Rerun with a lower --lr") as e:
        pretrain(pretrain_cfg(out=str(tmp_path), name="nan", epochs=2, lr=1e9, checkpoint_every=1,
                              log_every=100))
    kept = sorted((tmp_path / "nan").glob("checkpoint*.pt")) if (tmp_path / "nan").exists() else []
    for f in kept:
        ck = torch.load(f, weights_only=True)
        assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    said_kept = "the last checkpoint before it is in" in str(e.value)
    assert said_kept == bool(kept), (str(e.value), kept)


def test_resuming_refuses_a_checkpoint_trained_on_other_images(tmp_path):
    """A rerun after the data changed would mix two data sets, and its sidecar would vouch
    for the new images (the encoder's test-leak check trusts it): refused, files untouched."""
    import shutil

    from sstl.engine.data.synthetic import ensure_synthetic

    src, data = ensure_synthetic(), tmp_path / "data"
    for cls in sorted(p.name for p in src.iterdir() if p.is_dir()):
        (data / cls).mkdir(parents=True)
        for f in sorted((src / cls).glob("*.png"))[:40]:
            shutil.copy(f, data / cls / f.name)
    cfg = pretrain_cfg(out=str(tmp_path), name="grow", path=data, cache_dir=str(tmp_path / "c"))
    run = pretrain(cfg)
    before = {f: (run / f).read_bytes() for f in ("split.json", "encoder.json", "checkpoint.pt",
                                                  "timing.json", "metrics.csv")}
    extra = sorted((src / "COVID").glob("*.png"))[40:50]
    for f in extra:
        shutil.copy(f, data / "COVID" / f.name)
    with pytest.raises(SystemExit, match="trained on other inputs than this command's"):
        pretrain(cfg)
    assert {f: (run / f).read_bytes() for f in before} == before
    for f in extra:
        (data / "COVID" / f.name).unlink()
    # An image edited in place keeps its path: the images' bytes are part of the identity.
    edited = sorted((data / "Normal").glob("*.png"))[3]
    original = edited.read_bytes()
    shutil.copy(sorted((src / "Normal").glob("*.png"))[45], edited)
    with pytest.raises(SystemExit, match="the --data images changed since"):
        pretrain(cfg)
    assert {f: (run / f).read_bytes() for f in before} == before
    edited.write_bytes(original)
    pretrain(cfg)  # the same images again: resumes (a finished run rewrites its outputs)


def test_resuming_refuses_a_checkpoint_whose_init_file_changed_in_place(tmp_path):
    """--init PATH is in the resume key by its place only: a file replaced there (another
    stage-1 run written over it) would be continued from as if it were the start trained
    from. Refused by its bytes, files untouched; the same bytes again resume, and so does a
    checkpoint written before starts had digests."""
    from sstl.engine.models import backbone

    start = tmp_path / "start.pth"
    torch.manual_seed(0)
    torch.save(backbone("resnet18").state_dict(), start)
    original = start.read_bytes()
    cfg = pretrain_cfg(out=str(tmp_path), name="s", init=str(start))
    run = pretrain(cfg)
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert " init=" in ck["inputs"]
    before = {f: (run / f).read_bytes() for f in ("encoder.json", "checkpoint.pt", "metrics.csv")}
    torch.manual_seed(1)
    torch.save(backbone("resnet18").state_dict(), start)  # same size, other weights
    assert start.stat().st_size == len(original) and start.read_bytes() != original
    with pytest.raises(SystemExit, match="the --init file changed since"):
        pretrain(cfg)
    assert {f: (run / f).read_bytes() for f in before} == before
    start.write_bytes(original)
    pretrain(cfg)  # the start it was trained from: resumes (finished: rewrites its outputs)
    # Written before this check existed: inputs without a start digest still resume.
    torch.save(backbone("resnet18").state_dict(), start)
    ck["inputs"] = ck["inputs"].partition(" init=")[0]
    torch.save(ck, run / "checkpoint.pt")
    (run / "checkpoint.prev.pt").unlink(missing_ok=True)
    pretrain(cfg)


def test_resuming_with_another_number_of_processes_or_precision_is_said(tmp_path, capsys):
    """Checkpoints record the world size and compute dtype; a mid-epoch resume under another
    world size deals the rest of the epoch differently, another dtype trains differently, and
    the user is told so (the run continues)."""
    run = pretrain(pretrain_cfg(out=str(tmp_path), name="w", checkpoint_every=1,
                                checkpoint_minutes=1e6))
    last = torch.load(run / "checkpoint.pt", weights_only=True)
    assert last["world"] == 1 and last["dtype"] == "float32"
    ck = torch.load(run / "checkpoint.prev.pt", weights_only=True)  # the last mid-epoch one
    assert ck["epoch"] == 0 and ck["step"] > 0
    ck["world"] = 2
    ck["dtype"] = "bfloat16"  # as --precision auto trains on a GPU
    (run / "checkpoint.prev.pt").unlink()
    torch.save(ck, run / "checkpoint.pt")
    capsys.readouterr()
    pretrain(pretrain_cfg(out=str(tmp_path), name="w", checkpoint_every=1, checkpoint_minutes=1e6))
    err = " ".join(capsys.readouterr().err.split())
    assert "written by 2 processes, this run has 1; the rest of its interrupted epoch" in err
    assert "the checkpoint was trained in bfloat16, this run computes in float32" in err


def test_a_resumed_run_keeps_every_invocations_time_and_command(tmp_path, capsys, monkeypatch):
    cfg = pretrain_cfg(out=str(tmp_path), name="r")
    monkeypatch.chdir(tmp_path)
    run = pretrain(cfg)
    assert json.loads((run / "config.json").read_text())["cwd"] == str(tmp_path)
    monkeypatch.chdir(run)  # the second invocation from elsewhere: each keeps its own folder
    first = json.loads((run / "timing.json").read_text())
    assert first["sessions"] == 1 and first["earlier"] == [] and first["train"] > 0
    pretrain(cfg)  # finished: resumes at the end, rewrites the outputs
    assert "has finished its 1 epoch: nothing to train" in capsys.readouterr().err
    again = json.loads((run / "timing.json").read_text())
    assert again["sessions"] == 2 and again["earlier"] == [
        {k: v for k, v in first.items() if k not in ("sessions", "earlier", "total_all_sessions")}]
    assert again["total_all_sessions"] == pytest.approx(first["total"] + again["total"], abs=2e-3)
    config = json.loads((run / "config.json").read_text())
    assert len(config["earlier_commands"]) == 1 and set(config["earlier_commands"][0]) == {
        "command", "cwd", "time", "environment", "resolved"}
    assert config["earlier_commands"][0]["environment"]["git_sha"] == \
        config["environment"]["git_sha"]  # each invocation names the code it ran
    assert config["earlier_commands"][0]["cwd"] == str(tmp_path) and config["cwd"] == str(run)


def test_a_reporting_option_does_not_change_which_run_resumes():
    """--summary-last only changes summary.json: the same training resumes (and the key of a
    default config is the one runs made before this rule have)."""
    from sstl.engine.keys import resume_key

    base = finetune_cfg()
    assert resume_key(dataclasses.replace(base, summary_last=3)) == resume_key(base)
    assert resume_key(dataclasses.replace(base, epochs=3)) != resume_key(base)


def test_a_path_spelled_another_way_is_the_same_run(tmp_path, monkeypatch, capsys):
    """--data and --out typed relative, from another folder, name the same run directory and
    resume it; a checkpoint (and a directory name) of the earlier as-typed key still does."""
    from sstl.engine.config import check
    from sstl.engine.keys import resume_key
    from sstl.engine.data.synthetic import ensure_synthetic
    from sstl.engine.pretrain import default_name

    src = ensure_synthetic()
    absolute = pretrain_cfg(out=str(tmp_path / "runs"), path=str(src))
    run = pretrain(absolute)
    monkeypatch.chdir(src.parent)
    typed = check(pretrain_cfg(out=os.path.relpath(tmp_path / "runs"), path=src.name))
    assert resume_key(typed, as_typed=True) != resume_key(absolute, as_typed=True)
    capsys.readouterr()
    assert pretrain(typed).resolve() == run.resolve()
    assert "has finished its 1 epoch" in capsys.readouterr().err
    # As an earlier version left it: the checkpoint's key and the folder's name as typed.
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    ck["resume_key"] = resume_key(typed, as_typed=True)
    torch.save(ck, run / "checkpoint.pt")
    old = run.with_name(f"pretrain-cross-resnet18-{ck['resume_key'][:8]}")
    os.replace(run, old)
    assert default_name(typed) == old.name
    assert pretrain(typed).resolve() == old.resolve()
    assert "has finished its 1 epoch" in capsys.readouterr().err


def test_precision_typed_as_auto_chooses_is_the_same_run(tmp_path, capsys):
    """--precision fp32 on a CPU is what auto means there: one resume key and one directory;
    bf16 is another run. A checkpoint keyed as typed (earlier versions) still resumes."""
    from sstl.engine.config import check
    from sstl.engine.keys import resume_key, resume_keys

    def cfg(precision):
        return check(pretrain_cfg(out=str(tmp_path / "runs"), precision=precision))

    auto, fp32, bf16 = cfg("auto"), cfg("fp32"), cfg("bf16")
    assert resume_keys(fp32)[0] == resume_keys(auto)[0] != resume_keys(bf16)[0]
    run = pretrain(fp32)
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck["resume_key"] == resume_keys(auto)[0]
    ck["resume_key"] = resume_key(fp32, precision_as_typed=True)  # as a81f2ba wrote it
    assert ck["resume_key"] != resume_keys(fp32)[0]
    torch.save(ck, run / "checkpoint.pt")
    old = run.with_name(f"pretrain-cross-resnet18-{ck['resume_key'][:8]}")
    os.replace(run, old)
    capsys.readouterr()
    assert pretrain(fp32).resolve() == old.resolve()
    assert "has finished its 1 epoch" in capsys.readouterr().err


def test_a_run_continues_from_its_data_moved_elsewhere(tmp_path, capsys):
    """The data folder moved (or mounted elsewhere): the same images by content continue the
    run named by --name; a moved folder whose images changed, or another setting changed
    with the move, is still refused."""
    import shutil

    from sstl.engine.data.synthetic import ensure_synthetic

    src = tmp_path / "a" / "cxr"
    shutil.copytree(ensure_synthetic(), src)
    run = pretrain(pretrain_cfg(out=str(tmp_path / "runs"), name="r", path=str(src)))
    weights = load_file(run / "encoder.safetensors")
    moved = tmp_path / "b" / "cxr"
    shutil.move(str(src), str(moved))
    capsys.readouterr()
    assert pretrain(pretrain_cfg(out=str(tmp_path / "runs"), name="r", path=str(moved))) == run
    err = capsys.readouterr().err
    assert "its inputs are elsewhere now (data.path:" in err and "has finished its 1 epoch" in err
    assert all(torch.equal(v, load_file(run / "encoder.safetensors")[k])
               for k, v in weights.items())
    shutil.copytree(moved, tmp_path / "c" / "cxr")
    with pytest.raises(SystemExit, match="different settings .*data.path.*epochs: 1 -> 2"):
        pretrain(pretrain_cfg(out=str(tmp_path / "runs"), name="r",
                              path=str(tmp_path / "c" / "cxr"), epochs=2))
    first, second = sorted((tmp_path / "c" / "cxr").rglob("*.png"))[:2]
    first.write_bytes(second.read_bytes())  # one image edited in the copy
    with pytest.raises(SystemExit, match="different settings .*data.path"):
        pretrain(pretrain_cfg(out=str(tmp_path / "runs"), name="r",
                              path=str(tmp_path / "c" / "cxr")))


def test_a_default_named_run_whose_data_moved_is_pointed_to(tmp_path, capsys):
    """The default run name follows the data's place: after a move the same command starts a
    new run, and says which run it could continue with --name instead."""
    import shutil

    from sstl.engine.data.synthetic import ensure_synthetic

    src, moved = tmp_path / "a" / "cxr", tmp_path / "b" / "cxr"
    shutil.copytree(ensure_synthetic(), src)
    first = pretrain(pretrain_cfg(out=str(tmp_path / "runs"), path=str(src)))
    pretrain(pretrain_cfg(out=str(tmp_path / "runs"), path=str(src)))  # not moved: no note
    # A second data folder beside the first (both there) is other data, not a move; a
    # config.json of another shape among the runs is passed over.
    junk = tmp_path / "runs" / "pretrain-cross-resnet18-junk"
    junk.mkdir()
    (junk / "config.json").write_text('{"config": {"data": {"path": 5}}, "cwd": 5}')
    shutil.copytree(src, tmp_path / "c" / "cxr")
    pretrain(pretrain_cfg(out=str(tmp_path / "runs"), path=str(tmp_path / "c" / "cxr")))
    assert "note:" not in capsys.readouterr().err
    shutil.move(str(src), str(moved))
    second = pretrain(pretrain_cfg(out=str(tmp_path / "runs"), path=str(moved)))
    err = capsys.readouterr().err
    assert second != first and f"pass --name {first.name}" in err, err
    assert f"note: {first} is a run of these settings whose inputs were elsewhere" in err
    pretrain(pretrain_cfg(out=str(tmp_path / "runs"), path=str(moved), epochs=2))  # other run
    assert "note:" not in capsys.readouterr().err


def test_a_start_that_became_a_file_is_not_a_move(tmp_path):
    """only_moved: a path on both sides. imagenet or random recorded and a file now (or the
    synthetic set and a folder) is another start, which the inputs' check would not catch
    (a start named by word records no digest)."""
    from sstl.engine.config import to_dict
    from sstl.engine.keys import only_moved

    a, b = str(tmp_path / "a.pth"), str(tmp_path / "b.pth")
    assert only_moved(to_dict(finetune_cfg(init=a)), finetune_cfg(init=b))
    for old, new in (("random", a), (a, "random"), ("imagenet", a)):
        assert not only_moved(to_dict(finetune_cfg(init=old)), finetune_cfg(init=new)), (old, new)
    assert only_moved(to_dict(finetune_cfg(path=a)), finetune_cfg(path=b))
    assert not only_moved(to_dict(finetune_cfg()), finetune_cfg(path=b))  # synthetic -> a folder


def test_an_encoder_given_as_its_run_directory_or_its_file_is_one_run(tmp_path, monkeypatch):
    """`--encoder runs/x` and `--encoder runs/x/encoder.safetensors` name one file: one resume
    key and one directory, from any folder. Another file there is another start."""
    from sstl.engine.keys import resume_keys

    run = tmp_path / "runs" / "pre"
    run.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    keys = {resume_keys(finetune_cfg(encoder=e))[0] for e in (
        str(run), str(run / "encoder.safetensors"), "runs/pre", "runs/pre/encoder.safetensors",
        "./runs/../runs/pre/")}
    assert len(keys) == 1
    assert resume_keys(finetune_cfg(encoder=str(run / "other.safetensors")))[0] not in keys
    # Checkpoints of earlier versions keyed the file itself: still accepted, never the first.
    from sstl.engine.keys import resume_key

    (tmp_path / "runs" / "pre.v2").mkdir()  # --name allows dots
    for folder in ("pre", "pre.v2"):
        file_cfg = finetune_cfg(encoder=f"runs/{folder}/encoder.safetensors")
        earlier = resume_key(file_cfg, encoder_as_file=True)
        assert earlier != resume_keys(file_cfg)[0] and earlier in resume_keys(file_cfg)[1:]
        assert earlier in resume_keys(finetune_cfg(encoder=f"runs/{folder}"))  # either spelling


def test_the_git_sha_is_the_one_at_import(monkeypatch):
    """A long process (a reproduce grid) recorded, in each later run's config.json, commits
    made while it ran: the SHA is read once, when the code is loaded."""
    from sstl.engine import record

    before, real = record.git_sha(), record.subprocess.run

    def run(cmd, *a, **k):
        assert cmd[0] != "git", "git read again"
        return real(cmd, *a, **k)  # other programs (platform's) as before

    monkeypatch.setattr(record.subprocess, "run", run)
    assert record.git_sha() == before == record.environment()["git_sha"]


def test_an_input_larger_than_the_cache_is_a_warning_naming_both_flags():
    """Upsampled inputs are said (the run still goes on): each command names its own flag."""
    from sstl.engine.config import SupervisedConfig, size_warning

    assert size_warning(pretrain_cfg(view_size=64)) is None  # views 64 from a 64 px cache
    msg = size_warning(pretrain_cfg(view_size=96))
    assert "--view-size 96" in msg and "--cache-size 64" in msg
    assert size_warning(finetune_cfg(image_size=224)) is None  # the paper: 224 from 224
    msg = size_warning(finetune_cfg(image_size=256))
    assert "--image-size 256" in msg and "--cache-size 224" in msg
    assert "--image-size 64" in size_warning(SupervisedConfig(augment=dataclasses.replace(
        SupervisedConfig().augment, size=64)))  # stage 1's 32 px cache (CIFAR-10)
    assert size_warning(SupervisedConfig()) is None


def test_a_checkpoint_recorded_before_content_identities_compares_by_paths():
    """Dataset.identity is 'paths+contents'; a checkpoint of an earlier version recorded the
    paths' fingerprint alone and still resumes on the same paths, not on other ones."""
    from sstl.engine.inputs import changed_inputs, same_data

    assert same_data("aaaa+1111", "aaaa+1111") and not same_data("aaaa+1111", "aaaa+2222")
    assert same_data("aaaa", "aaaa+2222") and not same_data("bbbb", "aaaa+2222")
    assert changed_inputs("aaaa:enc init=s", "aaaa+1:enc init=s") == []
    assert changed_inputs("aaaa+2:enc init=s", "aaaa+1:enc init=s") == ["--data images"]
