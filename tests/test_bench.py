"""The fast step and the bench: FLOP counting against hand counts, fast == eager, JSON shape."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

from sstl.benchmarks.common import forward_flops
from sstl.engine.config import check, resolve
from sstl.engine.loop import train_step
from sstl.engine.methods import Cross, CrossConfig
from sstl.engine.pretrain import build_trainer

from .configs import pretrain_cfg


def test_flop_counter_one_conv_layer():
    conv = nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1)
    x = torch.randn(3, 16, 20, 20)
    macs = 3 * 32 * 16 * 3 * 3 * 10 * 10  # batch x Cout x Cin x k x k x Hout x Wout
    assert forward_flops(conv, x) == 2 * macs


def test_flop_counter_resnet50_224():
    net = torchvision.models.resnet50().eval()
    gmac = forward_flops(net, torch.randn(1, 3, 224, 224)) / 2 / 1e9
    assert abs(gmac - 4.09) < 0.02, gmac  # the published 4.09 GMAC


def _tiny_method():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Cross(net, 16, CrossConfig(proj_hidden=32, proj_dim=8, pred_hidden=32, tau=0.9))


def test_fast_step_matches_eager_step_fp32():
    cfg = check(pretrain_cfg("cross", precision="fp32", settings={"tau": 0.9}))
    eager_m, fast_m = _tiny_method(), _tiny_method()
    res = resolve(cfg.runtime, cfg.batch_size)
    eager = build_trainer(cfg, res, eager_m, total_steps=1)
    fast_cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, compile=True))
    fast = build_trainer(fast_cfg, dataclasses.replace(res, compile=True, channels_last=True),
                         fast_m.to(memory_format=torch.channels_last), total_steps=1)
    g = torch.Generator().manual_seed(1)
    v1, v2 = (torch.randn(8, 3, 16, 16, generator=g) for _ in range(2))
    loss_e = train_step(eager, (v1, v2), 0)
    loss_f = train_step(fast, (v1.contiguous(memory_format=torch.channels_last),
                               v2.contiguous(memory_format=torch.channels_last)), 0)
    torch.testing.assert_close(loss_f, loss_e, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(eager_m.state_dict().items(), fast_m.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


def test_short_cpu_bench_writes_every_rung(tmp_path):
    from sstl.benchmarks import step

    path = tmp_path / "step.json"
    step.run(device="cpu", arch="resnet18", batch_size=4, view_size=32, steps=1, warmup=1,
             repeats=1, json_path=path)
    result = json.loads(path.read_text())
    names = [r["rung"] for r in result["rows"]]
    assert names == [r.name for r in step.RUNGS]
    # Skipped exactly where a CPU cannot run the rung (bf16, compile, Triton); measured elsewhere.
    measured = {r.name for r in step.RUNGS if step.skip_reason(r, "cpu", False) is None}
    assert measured >= {"peer", "eager", "+channels_last", "sstl"}
    for r in result["rows"]:
        if r["rung"] in measured:
            assert not r.get("skipped") and r["images_per_s"] > 0 and 0 < r["mfu"] < 1.5, r
        else:
            assert r["skipped"] == step.skip_reason(step.RUNGS[names.index(r["rung"])],
                                                    "cpu", False), r
    assert result["machine"]["torch"] == torch.__version__
    assert result["flops_per_image"] > 0 and result["peak_flops"] > 0
    # The sstl rung is what `sstl pretrain` resolves on this device, reported in its columns.
    from sstl.engine.config import Runtime, resolve

    res, sstl = resolve(Runtime(device="cpu"), 4), result["rows"][names.index("sstl")]
    assert {k: sstl[k] for k in ("bf16", "compile", "graphs", "channels_last", "backend")} == {
        "bf16": res.dtype == "bfloat16", "compile": res.compile, "graphs": res.graphs,
        "channels_last": res.channels_last, "backend": res.backend}


def test_short_cpu_data_bench_reports_every_path(tmp_path):
    from sstl.benchmarks import data

    path = tmp_path / "data.json"
    data.run(device="cpu", batch_size=8, view_size=32, steps=1, repeats=1, warmup=1,
             json_path=str(path), log=lambda m: None)
    result = json.loads(path.read_text())
    assert set(result["rows"]) == {"DALI, cache", "DALI, files", "torch path",
                                   "DataLoader + torchvision"}
    from sstl.engine.data import dali

    for name, row in result["rows"].items():
        if name.startswith("DALI") and dali.IMPORT_ERROR is not None:  # skipped only for that
            assert "DALI not importable" in row["skipped"], name
        else:
            assert "skipped" not in row, (name, row)
            assert row["samples_per_s"] > 0 and row["cpu_ms_per_sample"] > 0, name
    assert result["rows"]["DataLoader + torchvision"]["vs_baseline"] == 1.0


def test_profile_sorts_kernels_by_kind():
    """Real kernel names seen in an H200 profile of the step land in their kinds."""
    from sstl.benchmarks.profile_step import kind

    seen = {
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc": "convolution",
        "void cutlass__5x_cudnn::Kernel<cutlass_tensorop_bf16_s16816fprop_optimized": "convolution",
        "nvjet_sm90_tst_256x128_64x4_1x2_h_ssched_bz_coopA_TNT": "matmul",
        "triton_poi_fused__native_batch_norm_legit_functional_convolution_backward":
            "fused elementwise/BN (Inductor)",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedSgdMathFunctor>":
            "sgd",
        "_ema_kernel": "ema/loss (sstl Triton)",
        "Memcpy DtoD (Device -> Device)": "copy/fill",
        "void at::native::elementwise_kernel<128, 2, gpu_kernel_impl<randn>>": "other",
    }
    assert {name: kind(name) for name in seen} == seen


def test_gpu_check_exits_non_zero_when_a_section_fails(tmp_path, monkeypatch):
    """A lent GPU's minutes are spent once: a failed check, a crashed section or a recipe
    command that exited non-zero must not read as success; a misspelt section is refused."""
    import sys

    import pytest

    from sstl.benchmarks import gpu_check

    assert gpu_check.failures("cuda", {"result": {"ema": {"ok": True, "rel_err": 0.0},
                                                  "loss": {"ok": False, "rel_err": 0.5}}}) \
        == ["check loss failed (rel_err 0.5)"]
    assert gpu_check.failures("recipe", {"result": {"rows": [
        {"pass": 1, "pretrain": {"rc": 0}, "finetune": {"rc": 1}}]}}) == [
        "pass 1 finetune exited 1"]
    # The first pass cut at the deadline measured nothing whole; a second one cut is recorded.
    assert gpu_check.failures("recipe", {"result": {"rows": [
        {"pass": 1, "pretrain": {"rc": 124}},
        {"pass": 2, "pretrain": {"rc": 0}, "finetune": {"rc": 124}}]}}) == [
        "pass 1 pretrain exited 124"]
    assert gpu_check.failures("recipe", {"result": gpu_check.recipe(None, 1e9)}) == [
        "skipped: --data None not found (copy cxr-dev-gray224 into the checkout)"]  # no data
    assert gpu_check.failures("kernels", {"error": "RuntimeError: x"}) == ["RuntimeError: x"]
    assert gpu_check.failures("cuda", {"result": {"ema": {"ok": True, "rel_err": 0.0}}}) == []

    monkeypatch.setattr(gpu_check, "cuda_checks", lambda *a: {"x": {"ok": False, "rel_err": 1}})
    monkeypatch.setattr(sys, "argv", ["gpu_check", "--device", "cpu", "--only", "cuda",
                                      "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="1 section\\(s\\) failed: cuda"):
        gpu_check.main()
    assert json.loads((tmp_path / "gpu-check.json").read_text())["failed"] == {
        "cuda": ["check x failed (rel_err 1)"]}
    # The engine refuses with SystemExit (ConfigError, DataError): that section fails, the
    # next one still runs, and every JSON is written.
    from sstl.benchmarks import data

    def refused(*a):
        raise SystemExit("--batch-size must be at least 2")
    monkeypatch.setattr(gpu_check, "cuda_checks", refused)
    monkeypatch.setattr(data, "run", lambda **kw: {"rows": {}})
    monkeypatch.setattr(sys, "argv", ["gpu_check", "--device", "cpu", "--only", "cuda", "data",
                                      "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="1 section\\(s\\) failed: cuda"):
        gpu_check.main()
    summary = json.loads((tmp_path / "gpu-check.json").read_text())
    assert summary["cuda"]["error"] == "SystemExit: --batch-size must be at least 2"
    assert summary["data"]["result"] == {"rows": {}}
    assert [p.name for p in tmp_path.iterdir()] == ["gpu-check.json"]  # a lease returns 8
    # An interrupted run (SIGTERM as a lease ends: the loop exits 130) stops the script: no
    # later section starts.
    ran = []

    def interrupted(*a):
        raise SystemExit(130)
    monkeypatch.setattr(gpu_check, "cuda_checks", interrupted)
    monkeypatch.setattr(data, "run", lambda **kw: ran.append("data"))
    with pytest.raises(SystemExit) as e:
        gpu_check.main()
    assert e.value.code == 130 and ran == []
    assert json.loads((tmp_path / "gpu-check.json").read_text())["failed"] == {
        "cuda": ["interrupted (exit 130)"]}
    monkeypatch.setattr(sys, "argv", ["gpu_check", "--only", "recipes"])
    with pytest.raises(SystemExit) as e:
        gpu_check.main()
    assert e.value.code == 2  # argparse: invalid choice


def test_a_loaded_checkpoint_gives_momentum_buffers_their_parameters_layout():
    """CUDA's fused SGD refuses a momentum buffer strided otherwise than its channels_last
    parameter; checkpoints whose host copies dropped the strides held NCHW buffers. Loading
    restores each buffer's parameter layout, values unchanged."""
    cfg = check(pretrain_cfg("cross", precision="fp32", settings={"tau": 0.9}))
    res = dataclasses.replace(resolve(cfg.runtime, cfg.batch_size), channels_last=True)
    t = build_trainer(cfg, res, _tiny_method().to(memory_format=torch.channels_last), 2)
    v = torch.randn(8, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    train_step(t, (v, v.flip(3)), 0)
    ck = t.state()
    moms = [s["momentum_buffer"] for s in ck["opt"]["state"].values()]
    assert any(m.dim() == 4 and not m.is_contiguous() for m in moms)  # channels_last buffers
    ck["opt"]["state"] = {k: {**s, "momentum_buffer": s["momentum_buffer"].contiguous()}
                          for k, s in ck["opt"]["state"].items()}  # as such a checkpoint held
    fresh = build_trainer(cfg, res, _tiny_method().to(memory_format=torch.channels_last), 2)
    fresh.load(ck)
    for group in fresh.opt.param_groups:
        for p in group["params"]:
            buf = fresh.opt.state[p]["momentum_buffer"]
            assert buf.stride() == p.stride()
    got = [fresh.opt.state[p]["momentum_buffer"] for g in fresh.opt.param_groups
           for p in g["params"]]
    for a, b in zip(got, moms):
        assert torch.equal(a, b)


def test_gpu_check_recipe_sends_back_records_not_weights(tmp_path, monkeypatch):
    """A lent machine returns at most 8 files from --out, under a size limit: the recipe's
    run directories stay elsewhere, and what they recorded (resolved config, timing,
    metrics.csv's rows, summary) goes into the rows, handed to `partial` after every
    command and written by main into the one gpu-check.json."""
    import sys
    import tempfile

    import pytest

    from sstl.benchmarks import gpu_check

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the run folders: not /tmp's

    def fake_run(argv, timeout):
        run = Path(argv[argv.index("--out") + 1]) / argv[argv.index("--name") + 1]
        run.mkdir(parents=True)
        (run / "config.json").write_text('{"resolved": {"dtype": "bfloat16"}}')
        (run / "timing.json").write_text('{"total": 1.0}')
        (run / "metrics.csv").write_text("epoch,images_per_s\n0,10\n1,20\n")
        (run / "checkpoint.pt").write_bytes(b"x" * 1000)
        return 0, ""
    monkeypatch.setattr(gpu_check, "run_bounded", fake_run)
    (tmp_path / "data").mkdir()
    partial = []
    result = gpu_check.recipe(str(tmp_path / "data"), 1e9, passes=1, partial=partial.append)
    assert gpu_check.failures("recipe", {"result": result}) == []
    pre = result["rows"][0]["pretrain"]
    assert pre["images_per_s_median_after_first"] == 20 and pre["timing"] == {"total": 1.0}
    assert pre["resolved"] == {"dtype": "bfloat16"}
    assert pre["metrics"] == [{"epoch": "0", "images_per_s": "10"},
                              {"epoch": "1", "images_per_s": "20"}]
    assert [len(p["rows"]) for p in partial] == [1, 1]  # after pretrain, after finetune
    assert "finetune" in partial[1]["rows"][0]

    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["gpu_check", "--only", "recipe", "--out", str(out),
                                      "--data", str(tmp_path / "data")])
    monkeypatch.setattr(gpu_check, "recipe", lambda data, deadline, partial: (
        partial({"rows": ["half"]}),
        {"written": json.loads((out / "gpu-check.json").read_text())["recipe"]})[1])
    gpu_check.main()
    assert [p.name for p in out.iterdir()] == ["gpu-check.json"]
    done = json.loads((out / "gpu-check.json").read_text())
    assert done["recipe"]["result"] == {"written": {"partial": {"rows": ["half"]}}}
    assert "git_sha" in done["machine"] and done["failed"] == {}

    def broken(data, deadline, partial):  # the rows finished before a crash stay
        partial({"rows": ["half"]})
        raise RuntimeError("disk full")
    monkeypatch.setattr(gpu_check, "recipe", broken)
    with pytest.raises(SystemExit, match="failed: recipe"):
        gpu_check.main()
    done = json.loads((out / "gpu-check.json").read_text())["recipe"]
    assert done["partial"] == {"rows": ["half"]} and done["error"] == "RuntimeError: disk full"


def test_gpu_check_recipe_stops_at_its_deadline_and_after_a_failure(tmp_path, monkeypatch):
    """The recipe must end before the lease's limit kills it: a command past the deadline is
    stopped (rc 124), a failed command ends the recipe, a pass starts only with `least_s`
    left, and a second pass cut at the deadline keeps its row without failing the check."""
    import tempfile
    import time

    from sstl.benchmarks import gpu_check

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the run folders: not /tmp's
    calls, plan = [], {}  # plan: a run's name -> "slow" (past the deadline) or its rc

    def fake_run(argv, timeout):
        name = argv[argv.index("--name") + 1]
        calls.append((name, timeout))
        time.sleep(plan.get("sleep", 0))
        if plan.get(name) == "slow":
            return 124, "epoch 3/40"
        return plan.get(name, 0), ""
    monkeypatch.setattr(gpu_check, "run_bounded", fake_run)
    (tmp_path / "data").mkdir()
    data = str(tmp_path / "data")

    plan.update({"pretrain-0": "slow"})
    r = gpu_check.recipe(data, deadline=time.perf_counter() + 100)
    assert [c[0] for c in calls] == ["pretrain-0"] and 0 < calls[0][1] <= 100
    assert r["rows"][0]["pretrain"]["rc"] == 124 and "finetune" not in r["rows"][0]
    assert r["rows"][0]["pretrain"]["tail"] == "stopped at the deadline: epoch 3/40"
    assert gpu_check.failures("recipe", {"result": r}) == ["pass 1 pretrain exited 124"]

    calls.clear()
    plan.clear()
    plan.update({"pretrain-0": 1})
    r = gpu_check.recipe(data, deadline=time.perf_counter() + 100)
    assert [c[0] for c in calls] == ["pretrain-0"] and len(r["rows"]) == 1

    calls.clear()
    plan.clear()
    plan.update({"finetune-1": "slow"})  # pass 2 reaches the deadline: kept, not a failure
    r = gpu_check.recipe(data, deadline=time.perf_counter() + 100)
    assert [c[0] for c in calls] == ["pretrain-0", "finetune-0", "pretrain-1", "finetune-1"]
    assert r["rows"][1]["finetune"]["rc"] == 124
    assert gpu_check.failures("recipe", {"result": r}) == []

    calls.clear()
    plan.clear()
    plan.update({"sleep": 0.3})  # pass 1 takes 0.6 s; 0.5 s are left, less than least_s
    r = gpu_check.recipe(data, deadline=time.perf_counter() + 1.1, least_s=0.8)
    assert [c[0] for c in calls] == ["pretrain-0", "finetune-0"]
    assert r["rows"][1]["pass"] == 2 and "of --budget left" in r["rows"][1]["skipped"]
    assert gpu_check.failures("recipe", {"result": r}) == []

    calls.clear()  # too little time to finish pass 1: not started, and counted as a failure
    r = gpu_check.recipe(data, deadline=time.perf_counter() + 30)
    assert calls == [] and "too little for the recipe" in r["skipped"]
    assert gpu_check.failures("recipe", {"result": r}) == [f"skipped: {r['skipped']}"]


def test_a_command_past_its_time_is_stopped_with_its_workers(tmp_path):
    """run_bounded stops the whole process group at the deadline: a worker the command
    started (as compile and loader workers are) does not outlive it; status 124, stderr
    kept. A command that ends in time gives its own status."""
    import os
    import time

    from sstl.benchmarks.gpu_check import run_bounded

    pid_file = tmp_path / "worker.pid"
    script = f"sleep 600 >/dev/null 2>&1 & echo $! > {pid_file}; echo started >&2; wait"
    t0 = time.perf_counter()
    rc, err = run_bounded(["sh", "-c", script], timeout=2, grace=2)
    assert rc == 124 and "started" in err and time.perf_counter() - t0 < 20
    worker = int(pid_file.read_text())
    def alive(pid: int) -> bool:  # a zombie (killed, not yet reaped by init) is dead
        try:
            os.kill(pid, 0)
            return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
        except (ProcessLookupError, FileNotFoundError):
            return False

    for _ in range(50):
        if not alive(worker):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"worker {worker} outlived the stopped command")
    assert run_bounded(["sh", "-c", "echo bad >&2; exit 3"], timeout=30) == (3, "bad\n")


def test_benchmark_json_is_strict(tmp_path):
    """A benchmark's undefined number (an MFU without a known peak) is null, as in every JSON
    the engine writes: a bare NaN breaks jq, JavaScript and databases reading the results."""
    from sstl.benchmarks.common import write_json

    write_json({"mfu": float("nan"), "rows": [{"ms": 1.5}]}, tmp_path / "a" / "r.json")
    text = (tmp_path / "a" / "r.json").read_text()
    assert "NaN" not in text and json.loads(text) == {
        "mfu": None, "rows": [{"ms": 1.5}]}
