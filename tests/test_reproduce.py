"""Stage 1 (`sstl supervised`) and `sstl reproduce`: a tiny grid end to end, its tables hold
the runs' own numbers, and a rerun redoes nothing."""
from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from sstl.engine import reproduce as reproduce_mod
from sstl.engine.config import (DataConfig, FinetuneAugment, ReproduceConfig, Runtime,
                                SupervisedConfig)
from sstl.engine.data.index import DataError
from sstl.engine.finetune import finetune
from sstl.engine.models import backbone
from sstl.engine.supervised import supervised

from .configs import finetune_cfg
from .conftest import SHARED

TINY = dict(arch="resnet18", pretrain_epochs=1, view_size=32, pretrain_batch=32,
            finetune_epochs=1, image_size=32, finetune_batch=32, cache_size=64, summary_last=1)
CIFAR = SHARED / "cifar10-train"


def _losses(run):
    with open(run / "metrics.csv") as fh:
        return [float(r["loss"]) for r in csv.DictReader(fh)]


def test_the_paper_preset_is_the_papers_protocol():
    """Section 3 of the paper: ResNet50, two 112 px views, batch 256, 40 pretraining epochs;
    30 fine-tuning epochs at 224 px; mean and std over the last 10 epochs."""
    p = reproduce_mod.PRESETS["paper"]
    assert (p["arch"], p["pretrain_epochs"], p["view_size"], p["pretrain_batch"]) == (
        "resnet50", 40, 112, 256)
    assert (p["finetune_epochs"], p["image_size"], p["summary_last"]) == (30, 224, 10)


@pytest.mark.skipif(not CIFAR.is_dir(), reason=f"CIFAR-10 not found at {CIFAR}")
def test_stage1_on_cifar_learns_and_its_encoder_is_a_start(tmp_path):
    for cls in sorted(p.name for p in CIFAR.iterdir())[:4]:  # 4 classes x 40 images
        (tmp_path / "cifar" / cls).mkdir(parents=True)
        for f in sorted((CIFAR / cls).iterdir())[:40]:
            shutil.copy(f, tmp_path / "cifar" / cls / f.name)
    run = supervised(SupervisedConfig(
        data=DataConfig(path=str(tmp_path / "cifar"), cache_size=32),
        runtime=Runtime(device="cpu", compile=False, out=str(tmp_path), name="s1", log_every=100),
        arch="resnet18", epochs=5, batch_size=32, lr=0.01))
    losses = _losses(run)
    assert losses[-1] < losses[0], losses
    meta = json.loads((run / "encoder.json").read_text())
    assert meta["stage"] == "supervised" and meta["arch"] == "resnet18"
    net = backbone("resnet18", init=str(run / "encoder.safetensors"))
    sd = load_file(run / "encoder.safetensors")
    assert all((net.state_dict()[k] == v).all() for k, v in sd.items())
    ft = finetune(finetune_cfg(out=str(tmp_path), name="ft", encoder=str(run)))
    assert json.loads((ft / "summary.json").read_text())["start"].endswith("encoder.safetensors")


def test_stage1_on_one_class_is_refused_as_finetune_refuses_it(tmp_path):
    """Found by a user: `supervised` on one class trained to loss 0 and top-1 1.0 and wrote an
    encoder; finetune and reproduce refused the same folder."""
    from .tiny_run import write_pngs

    write_pngs(tmp_path / "one" / "COVID", n=8)
    with pytest.raises(DataError, match="--data has one class \\('COVID'\\): a classifier "
                                        "needs at least two"):
        supervised(SupervisedConfig(data=DataConfig(path=str(tmp_path / "one"), cache_size=32),
                                    runtime=Runtime(device="cpu", compile=False,
                                                    out=str(tmp_path), name="s1"),
                                    arch="resnet18", epochs=1, batch_size=4))
    assert not (tmp_path / "s1").exists()


def test_tiny_grid_end_to_end_and_a_rerun_redoes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(reproduce_mod.PRESETS, "quick", TINY)
    s1 = supervised(SupervisedConfig(  # a stage-1 encoder (on the demo set) as the transfer start
        runtime=Runtime(device="cpu", compile=False, out=str(tmp_path), name="s1"),
        data=DataConfig(cache_size=64), arch="resnet18", epochs=1, batch_size=32, lr=0.01,
        augment=FinetuneAugment(size=32)))
    cfg = ReproduceConfig(runtime=Runtime(device="cpu", compile=False, out=str(tmp_path),
                                          name="grid", log_every=100),
                          preset="quick", rows=("ours", "transfer"),
                          fractions=(1.0,), transfer=str(s1 / "encoder.safetensors"))
    grid = reproduce_mod.reproduce(cfg)
    with open(grid / "table2.csv") as fh:
        table = {r["row"]: r for r in csv.DictReader(fh)}
    assert list(table) == ["ours", "transfer"]
    for row in table:  # the table holds each cell's own last-epochs mean
        s = json.loads((grid / f"finetune-{row}-f1-s0" / "summary.json").read_text())
        for k in ("sen", "spe", "hm", "auc", "acc"):
            assert float(table[row][f"{k}_mean"]) == pytest.approx(s["last_epochs"][k]["mean"],
                                                                   nan_ok=True), (row, k)
    ours = json.loads((grid / "pretrain-ours-s0" / "encoder.json").read_text())
    assert ours["init"].endswith("s1/encoder.safetensors")  # Ours starts from the transfer start
    assert json.loads((grid / "finetune-transfer-f1-s0" / "summary.json").read_text())[
        "start"].endswith("s1/encoder.safetensors")
    assert (grid / "fig3.png").stat().st_size > 1000 and (grid / "table2.md").exists()
    results = json.loads((grid / "results.json").read_text())
    assert len(results["cells"]) == 2
    # The config as the cells ran: the preset's cache size, not DataConfig's unused default.
    assert results["config"]["data"]["cache_size"] == TINY["cache_size"] != DataConfig().cache_size
    ck = json.loads((grid / "finetune-transfer-f1-s0" / "config.json").read_text())
    assert ck["config"]["data"]["cache_size"] == results["config"]["data"]["cache_size"]
    stamps = {p: p.stat().st_mtime_ns for p in grid.glob("*/*.safetensors")}
    reproduce_mod.reproduce(cfg)  # finished cells are read, never retrained
    assert stamps == {p: p.stat().st_mtime_ns for p in grid.glob("*/*.safetensors")}
    assert (grid / "table2.md").read_text().startswith(
        "# Table 2 (quick preset, 100% of the labels, 1 seed(s))")
    # Other settings in the same grid folder: refused before anything is written, where they
    # used to be read as finished cells under the new settings' title.
    other = dataclasses.replace(cfg, data=DataConfig(test_fraction=0.3))
    before = {p: p.stat().st_mtime_ns for p in grid.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit, match="other settings, images or --transfer file.*"
                                         "pretrain-ours-s0.*3 in all"):
        reproduce_mod.reproduce(other)
    assert before == {p: p.stat().st_mtime_ns for p in grid.rglob("*") if p.is_file()}
    # The --transfer file written over in place (another stage-1 run there): the cells that
    # started from it are refused, not read as if made from the new file.
    start = Path(cfg.transfer)
    original, weights = start.read_bytes(), load_file(start)
    key = next(k for k, v in weights.items() if v.is_floating_point())
    save_file({**weights, key: weights[key] + 1}, start)
    with pytest.raises(SystemExit, match=r"--transfer file.*\(pretrain-ours-s0, "
                                         r"finetune-transfer-f1-s0; 2 in all\)"):
        reproduce_mod.reproduce(cfg)
    start.write_bytes(original)
    assert before == {p: p.stat().st_mtime_ns for p in grid.rglob("*") if p.is_file()}
    # A pretraining redone since (its encoder file is another): the fine-tuning made from the
    # earlier one is not read as this grid's cell.
    side = grid / "pretrain-ours-s0" / "encoder.json"
    side.write_text(side.read_text().replace("{", '{"redone": true, ', 1))
    with pytest.raises(SystemExit, match="finetune-ours-f1-s0 was fine-tuned from an earlier"):
        reproduce_mod.reproduce(cfg)
    side.write_text(side.read_text().replace('{"redone": true, ', "{", 1))
    # Checkpoints deleted to save space (most of a grid's bytes): the cells' config.json still
    # tells other settings or another --transfer file apart, from any folder.
    for f in grid.glob("*/checkpoint*.pt"):
        f.unlink()
    monkeypatch.chdir(grid)
    with pytest.raises(SystemExit, match="other settings, images or --transfer file.*3 in all"):
        reproduce_mod.reproduce(other)
    save_file({**weights, key: weights[key] + 1}, start)
    with pytest.raises(SystemExit, match=r"--transfer file.*\(pretrain-ours-s0, "
                                         r"finetune-transfer-f1-s0; 2 in all\)"):
        reproduce_mod.reproduce(cfg)
    start.write_bytes(original)
    reproduce_mod.reproduce(cfg)  # the grid's own settings: every cell read, none retrained
    assert stamps == {p: p.stat().st_mtime_ns for p in grid.glob("*/*.safetensors")}
    # The --transfer file moved (the same bytes elsewhere): the grid is still this grid.
    shutil.copytree(s1, tmp_path / "moved" / "s1")
    reproduce_mod.reproduce(dataclasses.replace(
        cfg, transfer=str(tmp_path / "moved" / "s1" / "encoder.safetensors")))
    assert stamps == {p: p.stat().st_mtime_ns for p in grid.glob("*/*.safetensors")}
    # A grid built row by row: its tables hold every finished cell of its settings, not only
    # the rows the last command named (they used to drop the earlier commands' rows).
    reproduce_mod.reproduce(dataclasses.replace(cfg, rows=("scratch",)))
    for last in ("scratch", "transfer"):
        if last == "transfer":
            reproduce_mod.reproduce(dataclasses.replace(cfg, rows=("transfer",)))
        with open(grid / "table2.csv") as fh:
            assert [r["row"] for r in csv.DictReader(fh)] == ["ours", "transfer", "scratch"]
        results = json.loads((grid / "results.json").read_text())
        assert sorted(c["run"] for c in results["cells"]) == [
            "finetune-ours-f1-s0", "finetune-scratch-f1-s0", "finetune-transfer-f1-s0"]
        # Its config says what it holds, not the last command's --row alone.
        assert results["config"]["rows"] == ["ours", "transfer", "scratch"]
    assert stamps == {p: p.stat().st_mtime_ns for p in grid.glob("*/*.safetensors")
                      if "scratch" not in p.parent.name}
    # Found by a user: a later command with another --transfer file kept the Ours cells (their
    # pretraining started from the earlier file) under the new file's name. They are left
    # out, and said, as the Transfer cells are.
    odd = tmp_path / "odd" / "encoder.safetensors"
    shutil.copytree(s1, odd.parent)
    save_file({**weights, key: weights[key] + 1}, odd)
    capsys.readouterr()
    reproduce_mod.reproduce(dataclasses.replace(cfg, rows=("scratch",), transfer=str(odd)))
    said = capsys.readouterr().err
    for left_out in ("finetune-ours-f1-s0", "finetune-transfer-f1-s0"):
        assert f"reproduce: {left_out} is not in the tables" in said, said
    with open(grid / "table2.csv") as fh:
        assert [r["row"] for r in csv.DictReader(fh)] == ["scratch"]
    reproduce_mod.reproduce(dataclasses.replace(cfg, rows=("scratch",)))  # the grid's own file
    with open(grid / "table2.csv") as fh:
        assert [r["row"] for r in csv.DictReader(fh)] == ["ours", "transfer", "scratch"]
    # Folders that are no cell of this grid are passed over; a cell whose pretraining folder
    # was deleted since (to save space) still counts; a second seed of one row makes the note
    # say what ± means for each kind of row.
    for odd in ("finetune-scratch-f1.5-s0", "finetune-moco-f1-s0"):
        (grid / odd).mkdir()
        for f, text in (("summary.json", "{}"), ("model.json", '{"epoch": 1}')):
            (grid / odd / f).write_text(text)
    shutil.rmtree(grid / "pretrain-ours-s0")
    reproduce_mod.reproduce(dataclasses.replace(cfg, rows=("scratch",), seeds=2))
    with open(grid / "table2.csv") as fh:
        assert {r["row"]: r["seeds"] for r in csv.DictReader(fh)} == {
            "ours": "1", "transfer": "1", "scratch": "2"}
    md = (grid / "table2.md").read_text()
    assert md.startswith("# Table 2 (quick preset, 100% of the labels, 1-2 seed(s))")
    assert "where a row has several seeds" in md and "where it has one" in md
    assert reproduce_mod.RECIPE_NOTE in md  # the rows compare one protocol, and it says so


def test_a_positive_class_missing_from_the_data_is_refused_before_any_training(tmp_path):
    cfg = ReproduceConfig(runtime=Runtime(device="cpu", out=str(tmp_path), name="grid"),
                          data=DataConfig(cache_size=64), preset="quick", rows=("cross",),
                          positive_class="Flu")
    with pytest.raises(DataError, match="'Flu' is not a class"):
        reproduce_mod.reproduce(cfg)
    assert not (tmp_path / "grid").exists()


def test_too_few_images_for_the_presets_batch_are_refused_before_any_training(tmp_path):
    """reproduce has no --batch-size: the refusal says what to change (the data), not the
    flag pretrain's own message names."""
    cfg = ReproduceConfig(runtime=Runtime(device="cpu", out=str(tmp_path), name="grid"),
                          preset="paper", rows=("cross",), fractions=(1.0,))  # the demo set
    with pytest.raises(SystemExit, match=r"training images are fewer than one pretraining batch "
                       r"of the paper preset \(256\); reproduce needs more images$"):
        reproduce_mod.reproduce(cfg)
    assert not (tmp_path / "grid").exists()


def test_unknown_rows_are_refused(tmp_path):
    cfg = ReproduceConfig(runtime=Runtime(device="cpu", out=str(tmp_path)), rows=("moco",))
    with pytest.raises(SystemExit, match="--row: unknown moco"):
        reproduce_mod.reproduce(cfg)


def test_a_run_directory_is_a_start_and_random_is_no_transfer(tmp_path):
    """Found by a user: --init or --transfer naming a run directory said "no such file"
    (--encoder takes one), and --transfer random made Transfer a second From Scratch."""
    from sstl.engine.config import ConfigError, FinetuneConfig, PretrainConfig, check

    (tmp_path / "s1").mkdir()
    (tmp_path / "s1" / "encoder.safetensors").write_bytes(b"")  # what the check looks for
    encoder = str(tmp_path / "s1" / "encoder.safetensors")
    for cfg in (PretrainConfig(init=str(tmp_path / "s1")),
                FinetuneConfig(init=str(tmp_path / "s1"))):
        assert check(cfg).init == encoder
    assert check(ReproduceConfig(transfer=str(tmp_path / "s1"))).transfer == encoder
    assert check(FinetuneConfig(init="random")).init == "random"
    with pytest.raises(ConfigError, match="--transfer must be imagenet or a stage-1 encoder"):
        check(ReproduceConfig(transfer="random"))


def test_a_repeated_fraction_is_refused(tmp_path):
    """A repeat would be read back as a second seed of that cell (its ± from two copies)."""
    for fractions in ((1.0, 1.0), (0.5, 0.5000001)):  # the second pair: one run name, f0.5
        cfg = ReproduceConfig(runtime=Runtime(device="cpu", out=str(tmp_path)),
                              fractions=fractions)
        with pytest.raises(SystemExit, match="--fraction values repeat"):
            reproduce_mod.reproduce(cfg)


@pytest.mark.parametrize("case", ["missing", "unknown class"])
def test_a_bad_evaluate_on_set_is_refused_before_any_training(tmp_path, case):
    from .tiny_run import write_pngs

    other = tmp_path / "other"
    if case == "unknown class":
        write_pngs(other / "Martian", n=2), write_pngs(other / "COVID", n=2, seed=1)
    cfg = ReproduceConfig(runtime=Runtime(device="cpu", out=str(tmp_path), name="grid"),
                          data=DataConfig(cache_dir=str(tmp_path / "cache")), preset="quick",
                          rows=("scratch",), fractions=(1.0,), evaluate_on=str(other))
    match = "--evaluate-on .*other: no such" if case == "missing" else "class 'Martian'"
    with pytest.raises(SystemExit, match=match):
        reproduce_mod.reproduce(cfg)
    assert not (tmp_path / "grid").exists()


def test_fig3_table_prints_each_point_of_the_figure():
    rows = [("cross", "cross", "random"), ("scratch", None, "random")]
    pt = lambda m, s: {"hm": {"mean": m, "std": s}, "acc": {"mean": m / 2, "std": s / 2}}
    table = {"cross": {0.1: pt(0.8, 0.02), 1.0: pt(0.9, 0.01)}, "scratch": {1.0: pt(0.6, 0.1)}}
    lines = reproduce_mod.fig3_table(table, rows, (1.0, 0.1), "COVID")
    hm = lines[lines.index("| method | 10% | 100% |"):][2:4]
    assert hm == ["| Cross | 0.800 ± 0.020 | 0.900 ± 0.010 |", "| From Scratch |  | 0.600 ± 0.100 |"]
    acc_at = [i for i, line in enumerate(lines) if line.startswith("Fig. 3, Accuracy")][0]
    assert lines[acc_at + 4] == "| Cross | 0.400 ± 0.010 | 0.450 ± 0.005 |"
    assert "Fig. 3, HM (COVID vs rest), by label fraction:" in lines
    other = reproduce_mod.fig3_table(table, rows, (1.0, 0.1), positive="Normal")
    assert "Fig. 3, HM (Normal vs rest), by label fraction:" in other  # the class it scored


def test_csv_files_hold_each_row_and_fraction_across_seeds(tmp_path):
    """table2.csv (the full-label column) and fig3.csv (every point) against NumPy: the mean of
    the seeds' last-epochs means and their population std, with the fraction and seed count."""
    import numpy as np
    from sstl.engine.metrics import METRICS

    rows = [("cross", "cross", "random"), ("scratch", None, "random")]
    rng = np.random.default_rng(0)
    cells = [{"row": r, "fraction": f, "seed": s,
              **{k: {"mean": float(rng.random()), "std": 0.5} for k in METRICS}}
             for r, _, _ in rows for f in (0.1, 1.0) for s in (0, 1)
             if not (r == "scratch" and f == 0.1)]  # a point the grid lacks
    cfg = ReproduceConfig(runtime=Runtime(device="cpu", out=str(tmp_path), name="g"),
                          preset="quick", rows=("cross", "scratch"), fractions=(1.0, 0.1),
                          seeds=2)
    grid = tmp_path / "g"
    grid.mkdir()
    reproduce_mod.collect(cfg, grid, rows, cells)

    def read(name):
        with open(grid / name) as fh:
            return [(r["row"], float(r["fraction"]), int(r["seeds"]), r) for r in csv.DictReader(fh)]
    fig3 = read("fig3.csv")
    assert [p[:3] for p in fig3] == [("cross", 0.1, 2), ("cross", 1.0, 2), ("scratch", 1.0, 2)]
    for row, f, _, got in fig3:
        for k in METRICS:
            means = np.array([c[k]["mean"] for c in cells if (c["row"], c["fraction"]) == (row, f)])
            assert float(got[f"{k}_mean"]) == pytest.approx(means.mean(), rel=1e-12)
            assert float(got[f"{k}_std"]) == pytest.approx(means.std(), rel=1e-12)
    assert read("table2.csv") == [p for p in fig3 if p[1] == 1.0]
    # A row with no full-label cell is absent from Table 2: said, not silently dropped.
    reproduce_mod.collect(cfg, grid, rows, [c for c in cells if c["row"] != "scratch"
                                            or c["fraction"] != 1.0]
                          + [{**cells[0], "row": "scratch", "fraction": 0.1}])
    assert "Not in this table (no 100% cell yet; in Fig. 3's table below): From Scratch." in \
        (grid / "table2.md").read_text()


def test_the_spread_note_says_what_plus_minus_means_for_the_seed_counts_present():
    cfg = ReproduceConfig(preset="quick")
    note = {tuple(c): reproduce_mod.spread_note(cfg, set(c)) for c in ((1,), (3,), (1, 3), (2, 3))}
    assert "(population, one seed)" in note[(1,)] and "seeds' values" not in note[(1,)]
    assert "averaged over 3 seeds" in note[(3,)] and "one seed" not in note[(3,)]
    assert "where a row has several seeds" in note[(1, 3)] and "where it has one" in note[(1, 3)]
    assert "averaged over its seeds" in note[(2, 3)] and "one seed" not in note[(2, 3)]
