"""Every method on one data set, each pretrained then fine-tuned on a share of the labels.

The CPU-sized comparison of the methods (resnet18, small views, a few epochs): for each method
`sstl pretrain`, then `sstl finetune --encoder` at --fraction; plus the From Scratch row
(fine-tuning from random weights). Every cell is an ordinary run directory (rerunning resumes
and skips what is finished). Prints a markdown table and writes JSON.
    python -m sstl.benchmarks.methods_table --data ../shared/data/cxr-dev --out runs/table \
        --json benchmarks/results/methods-table-cpu.json
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

from sstl.engine.config import (AugmentConfig, DataConfig, FinetuneAugment, FinetuneConfig,
                                PretrainConfig, Runtime)
from sstl.engine.finetune import finetune
from sstl.engine.methods import METHODS
from sstl.engine.pretrain import pretrain

from .common import machine, write_json


def pretrain_rate(run: Path) -> float:
    with open(run / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    return sum(float(r["images_per_s"]) for r in rows[1:] or rows) / len(rows[1:] or rows)


def run(data: str, out: str, arch: str = "resnet18", epochs: int = 5, view: int = 64,
        batch: int = 64, fraction: float = 0.1, ft_epochs: int = 10, image: int = 64,
        methods=tuple(METHODS), seed: int = 0, json_path=None) -> dict:
    d = DataConfig(path=data, cache_size=max(view, image))
    rows = []
    for method in (*methods, "scratch"):
        t0 = time.perf_counter()
        rt = Runtime(device="cpu", out=out, seed=seed, log_every=50)
        enc, rate = None, None
        if method != "scratch":
            enc = pretrain(PretrainConfig(data=d, runtime=rt, method=method, arch=arch,
                                          init="random", epochs=epochs, batch_size=batch,
                                          augment=AugmentConfig(size=view)))
            rate = pretrain_rate(enc)
        ft = finetune(FinetuneConfig(data=d, runtime=rt, arch=arch, init="random",
                                     encoder=str(enc) if enc else None, fraction=fraction,
                                     epochs=ft_epochs, batch_size=batch,
                                     augment=FinetuneAugment(size=image),
                                     summary_last=min(10, ft_epochs)))
        s = json.loads((ft / "summary.json").read_text())["last_epochs"]
        rows.append({"method": method, "pretrain_images_per_s": rate,
                     **{k: s[k] for k in ("sen", "spe", "hm", "auc", "acc")},
                     "pretrain_run": str(enc) if enc else None, "finetune_run": str(ft),
                     "wall_s": time.perf_counter() - t0})
        print(table(rows), flush=True)
    result = {"bench": "methods_table", "machine": machine(), "data": data, "arch": arch,
              "pretrain_epochs": epochs, "view_size": view, "batch_size": batch,
              "fraction": fraction, "finetune_epochs": ft_epochs, "image_size": image,
              "seed": seed, "rows": rows}
    write_json(result, json_path)
    return result


def _num(v) -> str:  # summary.json writes an undefined value as null
    return "nan" if v is None else f"{v:.3f}"


def table(rows: list[dict]) -> str:
    head = "| method | pretrain img/s | Sen | Spe | HM | AUC | Acc |\n|---|---:|---:|---:|---:|---:|---:|"
    lines = [head]
    for r in rows:
        cells = [f"{_num(r[k]['mean'])} ± {_num(r[k]['std'])}" for k in ("sen", "spe", "hm", "auc", "acc")]
        rate = f"{r['pretrain_images_per_s']:.0f}" if r["pretrain_images_per_s"] else "-"
        lines.append(f"| {r['method']} | {rate} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", default="runs/methods-table")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--view", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--ft-epochs", type=int, default=10)
    p.add_argument("--image", type=int, default=64)
    p.add_argument("--methods", nargs="*", default=list(METHODS))
    p.add_argument("--json", default=None)
    a = p.parse_args()
    run(a.data, a.out, a.arch, a.epochs, a.view, a.batch, a.fraction, a.ft_epochs, a.image,
        tuple(a.methods), json_path=a.json)


if __name__ == "__main__":
    main()
