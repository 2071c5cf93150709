"""Frozen configuration: one dataclass per command, a comment per field, defaults in one place.

The CLI only fills these (it reads its defaults from them). `check(cfg)` is the one place
where a user's values are refused, with one line and a non-zero exit, before any work is
done; it also fills the method's own settings. Values that depend on the machine (device,
dtype, data path, per-process batch) come from `resolve()` and are saved beside the config.
Nothing here imports the commands: config sits below them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .data.augment import (IMAGENET_MEAN, IMAGENET_STD, AugmentConfig, FinetuneAugment,  # noqa: F401
                           ViewAugment)
from .data.backends import pick_backend
from .dist import env as dist_env
from .data.cache import default_cache_dir
from .io import save_json  # noqa: F401  (re-exported: commands write JSON through it)
from .methods import METHODS, SettingError, method_settings
from .models import ARCHS, imagenet_versions


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "AugmentConfig", "FinetuneAugment", "ViewAugment",
           "DataConfig", "Runtime", "PretrainConfig", "FinetuneConfig", "PredictConfig",
           "EvaluateConfig", "SupervisedConfig", "ReproduceConfig", "ExportConfig",
           "BenchConfig", "CacheConfig", "ROWS", "ConfigError", "Resolved", "check", "resolve",
           "inference_runtime", "pick_device", "auto_precision", "save_json"]


class ConfigError(SystemExit):
    """A value the user gave that cannot mean anything: printed as one line, exit code 1."""


@dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they are split and cached (shared by all commands)."""

    path: str | None = None  # folder or manifest.csv; None = the embedded synthetic default
    cache_dir: str | None = None  # decode-once cache; None = $SSTL_CACHE or ~/.cache/sstl
    cache_size: int = 224  # side of the stored uint8 images (the sets here are 224x224)
    test_fraction: float = 0.2  # held-out share, stratified by class, never splitting a group
    split_seed: int = 0  # fixes the split; kept apart from `seed` so runs share one test set
    scan_workers: int = 0  # parallel decoders for scan + cache; 0 = number of CPUs



@dataclass(frozen=True)
class Runtime:
    """How and where a training command runs; shared by every training command."""

    device: str = "auto"  # auto | cuda | cpu
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    compile: bool | None = None  # torch.compile the networks; None = on for CUDA, off for CPU
    # Replay each step as one CUDA graph (engine/accel.py); None = on for CUDA in one process
    cuda_graphs: bool | None = None
    backend: str = "auto"  # data path: auto (DALI if importable and on a GPU) | dali | torch
    seed: int = 0  # training randomness: head init, data order, augmentation, label subset
    out: str = "runs"  # parent folder of run directories
    name: str | None = None  # run directory; None = named by command, method, arch and settings
    log_every: int = 10  # steps between host reads of the loss (the only per-step syncs)
    checkpoint_every: int = 0  # also checkpoint every N steps; 0 = by time and at the end only
    checkpoint_minutes: float = 5.0  # wall-clock minutes between checkpoints
    resume: bool = True  # continue from the run directory's checkpoint when it has one


REPORT_ONLY = ("summary_last",)  # fields that change what is reported, not what is trained
# Runtime fields that may change between a run and its resumption without changing its result.
RESUMABLE_RUNTIME = ("device", "compile", "cuda_graphs", "backend", "out", "name", "log_every",
                     "checkpoint_every", "checkpoint_minutes", "resume")


@dataclass(frozen=True)
class PretrainConfig:
    """`sstl pretrain`: the paper's self-supervised stage (defaults are the paper's)."""

    data: DataConfig = DataConfig()  # the unlabelled (or labelled) chest X-rays
    runtime: Runtime = Runtime()  # device, precision, run directory, checkpoints, seed
    method: str = "cross"  # cross (the paper) | byol | simsiam | simclr | pirl-jigsaw|-rotation
    settings: Any = None  # the method's settings dataclass; None = its defaults (filled by check)
    arch: str = "resnet50"  # resnet50 (paper) | resnet18 (small runs)
    init: str = "imagenet"  # imagenet | random | PATH to a state dict (.pth/.safetensors)
    imagenet_weights: str = "auto"  # torchvision IMAGENET1K_ V1 (the paper's era) | V2 | auto
    epochs: int = 40  # paper: 40
    batch_size: int = 256  # paper: 256 (global, across all processes)
    lr: float = 0.03  # paper: SGD lr 0.03 (constant)
    momentum: float = 0.9  # paper: 0.9
    weight_decay: float = 4e-4  # paper: 4e-4
    augment: AugmentConfig = AugmentConfig()  # the two views (paper: 112x112)
    split: str = "train"  # which images pretraining sees: train (test stays unseen) | all


@dataclass(frozen=True)
class FinetuneConfig:
    """`sstl finetune`: supervised fine-tuning and the paper's evaluation protocol.

    The paper states 30 epochs and an evaluation on the test split after every epoch; the
    optimizer, schedule, batch and image size it leaves open are chosen in the README.
    """

    data: DataConfig = DataConfig()  # the labelled chest X-rays and their train/test split
    runtime: Runtime = Runtime()  # device, precision, run directory, checkpoints, seed
    arch: str = "resnet50"  # must match the encoder's arch when --encoder is given
    encoder: str | None = None  # encoder.safetensors from `sstl pretrain` (or its run dir)
    init: str = "imagenet"  # without --encoder: imagenet ("Transfer") | random ("From Scratch")
    imagenet_weights: str = "auto"  # torchvision IMAGENET1K_ V1 | V2 | auto (as in pretrain)
    fraction: float = 1.0  # share of the training split's labels used (paper: 0.01/0.1/0.5/1)
    epochs: int = 30  # paper: 30, evaluated on the test split after every epoch
    batch_size: int = 64  # not stated by the paper; see README
    lr: float = 0.01  # SGD peak learning rate; not stated by the paper; see README
    schedule: str = "cosine"  # cosine (per step, from --lr down to 0 at the end) | constant
    momentum: float = 0.9  # SGD momentum, as in pretraining
    weight_decay: float = 1e-4  # the usual ResNet value; the head and BN are decayed too
    label_smoothing: float = 0.0  # cross-entropy label smoothing (0 = plain cross-entropy)
    augment: FinetuneAugment = FinetuneAugment()  # input side (224) and the training crops
    positive_class: str = "COVID"  # the positive class of sensitivity/specificity/AUC
    summary_last: int = 10  # Table 2 reports mean and std over the last 10 epochs


@dataclass(frozen=True)
class SupervisedConfig:
    """`sstl supervised`: the paper's stage 1, a backbone trained with labels on natural images.

    Defaults follow the usual ImageNet recipe (torchvision's): SGD 0.1, momentum 0.9, weight
    decay 1e-4, batch 256, cosine schedule, random-resized crops of 8-100% of the area.
    """

    data: DataConfig = DataConfig(cache_size=32)  # class folders of natural images (CIFAR-10: 32 px)
    runtime: Runtime = Runtime()  # device, precision, run directory, checkpoints, seed
    arch: str = "resnet50"  # the backbone the later stages use
    init: str = "random"  # random | imagenet | PATH: where stage 1 itself starts
    imagenet_weights: str = "auto"  # with --init imagenet: IMAGENET1K_ V1 | V2 | auto
    epochs: int = 90  # the ImageNet recipe; the CIFAR-10 stand-in needs far fewer
    batch_size: int = 256  # global, across all processes
    lr: float = 0.1  # SGD peak learning rate (0.1 at batch 256)
    schedule: str = "cosine"  # cosine (per step, to 0) | constant
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # on every weight
    label_smoothing: float = 0.0  # cross-entropy label smoothing (0 = plain cross-entropy)
    augment: FinetuneAugment = FinetuneAugment(size=32, train=ViewAugment(
        crop_scale=(0.08, 1.0), flip_p=0.5, blur_p=0.0, jitter_p=0.8, brightness=0.4,
        contrast=0.4))  # the input side (--image-size) and ImageNet-style crops


# Table 2's rows in the paper's order: (name, pretraining method or None, start).
ROWS = [("ours", "cross", "transfer"), ("transfer", None, "transfer"),
        ("cross", "cross", "random"), ("byol", "byol", "random"),
        ("simsiam", "simsiam", "random"), ("simclr", "simclr", "random"),
        ("pirl-jigsaw", "pirl-jigsaw", "random"), ("pirl-rotation", "pirl-rotation", "random"),
        ("scratch", None, "random")]


@dataclass(frozen=True)
class ReproduceConfig:
    """`sstl reproduce`: the grid of Table 2 (rows x all labels) and Fig. 3 (label fractions).

    Every cell is an ordinary run directory under <out>/<name>/, so an interrupted grid
    continues where it stopped and a finished cell is never redone.
    """

    data: DataConfig = DataConfig()  # the labelled chest X-rays every cell trains and tests on
    runtime: Runtime = Runtime()  # out/name: where the grid's folder goes; seed: the first seed
    preset: str = "paper"  # paper (resnet50, the paper's settings; a GPU job) | quick (CPU-sized)
    rows: tuple[str, ...] = ()  # Table 2's rows to run; () = every row sstl can train
    fractions: tuple[float, ...] = (0.01, 0.1, 0.5, 1.0)  # Fig. 3's label fractions
    seeds: int = 1  # repetitions with seeds seed, seed+1, ...; tables report mean and std over them
    transfer: str = "imagenet"  # the transfer start: imagenet | PATH to a stage-1 encoder
    evaluate_on: str | None = None  # another labelled set every fine-tuned model is evaluated on
    positive_class: str = FinetuneConfig.positive_class  # of Sen/Spe/HM/AUC, as in finetune


@dataclass(frozen=True)
class PredictConfig:
    """`sstl predict`: class probabilities for image files and folders."""

    model: str  # run directory of `sstl finetune`, or its model.safetensors
    inputs: tuple[str, ...]  # image files and folders (folders are searched recursively)
    out_csv: str = "predictions.csv"  # one row per image; default in the current folder
    batch_size: int = 64  # images per forward pass
    device: str = "auto"  # auto | cuda | cpu
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    cam: str | None = None  # folder for Grad-CAM overlays; None = none
    # P(positive class) at or above which that class is predicted (an operating point, e.g.
    # 0.2 for screening); None = the most probable class, the paper's rule (metrics.decide)
    threshold: float | None = None


@dataclass(frozen=True)
class EvaluateConfig:
    """`sstl evaluate`: the paper's metrics of a fine-tuned model on any labelled data."""

    model: str  # run directory of `sstl finetune`, or its model.safetensors
    # Labelled folder or manifest; its split settings for --split. cache_size None: the
    # model's own (model.json), so images are decoded as training and `sstl predict` decode them.
    data: DataConfig = DataConfig(cache_size=None)
    split: str = "all"  # all: every image | test: the held-out split of `data`
    out: str | None = None  # folder for metrics.json, predictions.csv and the figures; None = none
    batch_size: int = 64  # images per forward pass
    device: str = "auto"  # auto | cuda | cpu
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    threshold: float | None = None  # as predict's: Sen, Spe, HM, Acc at that operating point


@dataclass(frozen=True)
class ExportConfig:
    """`sstl export`: a fine-tuned model as ONNX, checked against torch on real images."""

    model: str  # run directory of `sstl finetune`, or its model.safetensors
    format: str = "onnx"  # onnx (the only format so far)
    out: str | None = None  # the .onnx file to write; None = model.onnx in the run directory
    images: tuple[str, ...] = ()  # files or folders to check on; () = the run's data, else synthetic
    tolerance: float = 1e-4  # largest accepted |onnx - torch| probability


@dataclass(frozen=True)
class BenchConfig:
    """`sstl bench`: the step, data and kernel benchmarks (see benchmarks/), side by side."""

    what: str = "step"  # step | data | kernels | all
    data: str | None = None  # images for step and data; None = the embedded synthetic set
    device: str = "auto"  # auto | cuda | cpu
    arch: str = PretrainConfig.arch  # the step's and kernels' backbone
    batch_size: int | None = None  # None: 256 on a GPU; on a CPU 32 for step, 64 for data
    view_size: int = AugmentConfig.size  # side of each of the two views
    steps: int | None = None  # timed steps per repeat; None: step 20 GPU / 2 CPU, data 30 / 8
    cpu_all: bool = False  # on a CPU, also the bf16 and compile rungs (slow; off by default)
    json: str | None = None  # a file for all results; None = none


@dataclass(frozen=True)
class CacheConfig:
    """`sstl cache`: the decode-once caches, listed, and pruned of what no sstl can read."""

    cache_dir: str | None = None  # None: $SSTL_CACHE or ~/.cache/sstl
    prune: bool = False  # delete stale and incomplete entries
    other_versions: bool = False  # with prune: also other sstl versions' (and decoders') caches


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# ------------------------------------------------------------------ checks of user input
def check(cfg):
    """Refuse values that cannot mean anything (one line, non-zero exit); fill method settings.

    Returns the checked config (a PretrainConfig comes back with its method's settings).
    Every command's config is checked here, by its own function below.
    """
    checks = {PretrainConfig: _check_pretrain, FinetuneConfig: _check_classifier,
              SupervisedConfig: _check_classifier, ReproduceConfig: _check_reproduce,
              PredictConfig: _check_inference, EvaluateConfig: _check_inference,
              ExportConfig: _check_export, BenchConfig: _check_bench, CacheConfig: _check_cache}
    if type(cfg) not in checks:
        raise TypeError(f"no checks for {type(cfg).__name__}")
    return checks[type(cfg)](cfg, _need)


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _check_training(cfg, need):
    """What pretrain, finetune and supervised share: runtime, data, SGD, backbone and start.
    Returns `cfg` with --imagenet-weights auto made the version it means (imagenet_version)."""
    _check_runtime(cfg.runtime, need)
    _check_data(cfg.data, need)
    need(cfg.epochs >= 1, f"--epochs must be at least 1, not {cfg.epochs}")
    need(cfg.batch_size >= 2, f"--batch-size must be at least 2 (BatchNorm trains on two "
         f"images or more), not {cfg.batch_size}")
    need(cfg.lr > 0, f"--lr must be positive, not {cfg.lr}")
    need(0 <= cfg.momentum < 1, f"--momentum must be in [0, 1), not {cfg.momentum}")
    need(cfg.weight_decay >= 0, f"--weight-decay must be >= 0, not {cfg.weight_decay}")
    need(cfg.arch in ARCHS, f"--arch must be {' or '.join(ARCHS)}, not {cfg.arch!r}")
    need(cfg.imagenet_weights.upper() in ("V1", "V2", "AUTO"),
         f"--imagenet-weights must be V1, V2 or auto, not {cfg.imagenet_weights!r}")
    uses = cfg.init == "imagenet" and getattr(cfg, "encoder", None) is None
    version = imagenet_version(cfg.arch, cfg.imagenet_weights, uses)
    have = imagenet_versions(cfg.arch)
    need(not uses or version.upper() in have,
         f"--arch {cfg.arch} has only {' and '.join(have)} ImageNet weights in torchvision; "
         f"pass --imagenet-weights {have[-1]} (or auto)")
    return dataclasses.replace(cfg, imagenet_weights=version, init=weights_in(cfg.init))


def weights_in(start: str) -> str:
    """A run directory given as a start (--init, --transfer) means its encoder.safetensors,
    as --encoder takes one; anything else stays as given (its loader says what is wrong)."""
    if start in ("imagenet", "random"):
        return start
    p = Path(start).expanduser()
    return str(p / "encoder.safetensors") if (p / "encoder.safetensors").is_file() else start


def imagenet_version(arch: str, given: str, used: bool = True) -> str:
    """What --imagenet-weights means: a version as given; auto is the newest the arch has in
    torchvision (V2 for resnet50, V1 for resnet18), and V2 where no ImageNet start is used
    (the value earlier versions recorded there, so their runs keep their resume keys)."""
    if given.upper() != "AUTO":
        return given
    return imagenet_versions(arch)[-1] if used and arch in ARCHS else "V2"


def _check_pretrain(cfg: PretrainConfig, need) -> PretrainConfig:
    cfg = _check_training(cfg, need)
    need(cfg.method in METHODS,
         f"--method must be one of {', '.join(METHODS)}, not {cfg.method!r}")
    need(cfg.augment.size >= 32, f"--view-size must be at least 32, not {cfg.augment.size}")
    need(cfg.split in ("train", "all"), f"--split must be train or all, not {cfg.split!r}")
    try:
        given = cfg.settings
        if given is None or isinstance(given, dict):
            settings = method_settings(cfg.method, given)
        else:
            settings = given
            need(type(settings) is METHODS[cfg.method].config,
                 f"settings {type(settings).__name__} do not belong to --method {cfg.method}")
    except SettingError as e:
        raise ConfigError(str(e)) from None
    _check_settings(settings, need)
    need(cfg.runtime.backend != "dali" or METHODS[cfg.method].cls.views == "two_crops",
         f"--backend dali cannot make {cfg.method}'s pretext views; use --backend torch "
         "or auto")
    # Each process would update only its own images' memory-bank rows, so the banks
    # would drift apart and half of every rank's negatives would stay at their start.
    need(dist_env()[1] == 1 or METHODS[cfg.method].cls.views == "two_crops",
         f"--method {cfg.method} runs in one process only: its memory bank is not shared "
         "across torchrun's processes; run it without torchrun")
    return dataclasses.replace(cfg, settings=settings)


def _check_classifier(cfg, need):
    """finetune and supervised: the supervised step's settings."""
    cfg = _check_training(cfg, need)
    need(cfg.schedule in ("cosine", "constant"),
         f"--schedule must be cosine or constant, not {cfg.schedule!r}")
    need(cfg.augment.size >= 32, f"--image-size must be at least 32, not {cfg.augment.size}")
    need(0 <= cfg.label_smoothing < 1,
         f"--label-smoothing must be in [0, 1), not {cfg.label_smoothing}")
    if isinstance(cfg, FinetuneConfig):
        need(0 < cfg.fraction <= 1, f"--fraction must be in (0, 1], not {cfg.fraction}")
        need(cfg.summary_last >= 1,
             f"--summary-last must be at least 1, not {cfg.summary_last}")
    return cfg


def _check_reproduce(cfg: ReproduceConfig, need) -> ReproduceConfig:
    _check_runtime(cfg.runtime, need)
    _check_data(cfg.data, need)
    need(cfg.preset in ("paper", "quick"), f"--preset must be paper or quick, not {cfg.preset!r}")
    # random would make Transfer From Scratch and Ours the Cross row, under their names.
    need(cfg.transfer != "random", "--transfer must be imagenet or a stage-1 encoder (a file, "
         "or its run directory), not random: the rows that start from random weights are "
         "Cross and From Scratch")
    need(cfg.seeds >= 1, f"--seeds must be at least 1, not {cfg.seeds}")
    names = [n for n, _, _ in ROWS]
    unknown = [r for r in cfg.rows if r not in names]
    need(not unknown, f"--row: unknown {', '.join(unknown)}; rows are {', '.join(names)}")
    need(cfg.runtime.seed + cfg.seeds <= 2 ** 63,
         f"--seed {cfg.runtime.seed} + --seeds {cfg.seeds} passes 2**63")
    need(len(cfg.fractions) > 0 and all(0 < f <= 1 for f in cfg.fractions),
         f"--fraction values must be in (0, 1], not {cfg.fractions}")
    # A repeat would count as a seed; fractions that print alike would share a run name.
    need(len({f"{f:g}" for f in cfg.fractions}) == len(cfg.fractions),
         f"--fraction values repeat: {cfg.fractions}")
    return dataclasses.replace(cfg, transfer=weights_in(cfg.transfer))


def _check_inference(cfg, need):
    """predict and evaluate."""
    need(cfg.batch_size >= 1, f"--batch-size must be at least 1, not {cfg.batch_size}")
    # 0 and 1 would call every image positive, or none: a rule, not an operating point.
    need(cfg.threshold is None or 0 < cfg.threshold < 1,
         f"--threshold must be between 0 and 1 (exclusive), not {cfg.threshold}")
    _check_device(cfg.device, cfg.precision, need)
    _check_outputs(cfg, need)  # now: found wrong after inference, results would be lost
    if isinstance(cfg, EvaluateConfig):
        given = cfg.data.cache_size
        _check_data(dataclasses.replace(cfg.data, cache_size=given or 224), need)
        need(given is None or given >= 32, f"--cache-size must be at least 32, not {given}")
        need(cfg.split in ("all", "test"), f"--split must be all or test, not {cfg.split!r}")
    return cfg


def _check_export(cfg: ExportConfig, need) -> ExportConfig:
    need(cfg.format == "onnx", f"--format must be onnx, not {cfg.format!r}")
    need(cfg.tolerance >= 0, f"--tolerance must be >= 0, not {cfg.tolerance}")  # NaN too
    out = None if cfg.out is None else Path(cfg.out).expanduser()
    need(out is None or (out.name and not out.is_dir()),
         f"--out {cfg.out} is a folder; name the .onnx file to write")
    # model.json is one wrong word away: the export never writes over other files.
    need(out is None or out.suffix.lower() == ".onnx", f"--out {cfg.out}: name a .onnx file "
         "(the export never writes over other files, such as the run's weights or sidecar)")
    return cfg


def _check_bench(cfg: BenchConfig, need) -> BenchConfig:
    need(cfg.what in ("step", "data", "kernels", "all"),
         f"--what must be step, data, kernels or all, not {cfg.what!r}")
    _check_device(cfg.device, "auto", need)  # the benchmarks pick their own precisions
    pick_device(cfg.device)  # --device cuda without CUDA is refused there
    need(cfg.arch in ARCHS, f"--arch must be {' or '.join(ARCHS)}, not {cfg.arch!r}")
    need(cfg.batch_size is None or cfg.batch_size >= 2, f"--batch-size must be at least 2 "
         f"(BatchNorm trains on two images or more), not {cfg.batch_size}")
    need(cfg.view_size >= 32, f"--view-size must be at least 32, not {cfg.view_size}")
    need(cfg.steps is None or cfg.steps >= 1, f"--steps must be at least 1, not {cfg.steps}")
    _check_out_file(cfg.json, "--json", "bench.json", need)
    need(cfg.json is None or _earlier_bench(Path(cfg.json).expanduser()),
         f"--json {cfg.json} exists and is not an earlier `sstl bench` result: it would be "
         "replaced; name a new file")
    return cfg


def _earlier_bench(path: Path) -> bool:
    """Whether bench may write its JSON at `path`: nothing is there, or an earlier bench's
    (an object of step, data and kernels results)."""
    try:
        found = json.loads(path.read_text())
    except FileNotFoundError:
        return True
    except (OSError, ValueError):  # unreadable, or not JSON: someone else's file
        return False
    return isinstance(found, dict) and set(found) <= {"step", "data", "kernels"}


def _check_cache(cfg: CacheConfig, need) -> CacheConfig:
    need(cfg.cache_dir is None or Path(cfg.cache_dir).expanduser().is_dir(),
         f"--cache-dir {cfg.cache_dir} is not a folder")
    need(cfg.prune or not cfg.other_versions, "--other-versions goes with --prune")
    return cfg


def _check_device(device: str, precision: str, need) -> None:
    """--device and --precision: every command that runs a model takes both."""
    need(device in ("auto", "cuda", "cpu"), f"--device must be auto, cuda or cpu, not {device!r}")
    need(precision in ("auto", "bf16", "fp32"),
         f"--precision must be auto, bf16 or fp32, not {precision!r}")


def _check_out_file(path: str | None, flag: str, example: str, need) -> None:
    """A file a command writes (--out-csv, --json): not a folder, and under no file."""
    if path is None:
        return
    need(not Path(path).expanduser().is_dir(),
         f"{flag} {path} is a folder; name a file, e.g. {Path(path) / example}")
    need(_folder_ok(str(Path(path).expanduser().parent)),
         f"{flag} {path}: a file is in the way of its folder")


def _check_runtime(rt: Runtime, need) -> None:
    _check_device(rt.device, rt.precision, need)
    need(rt.backend in ("auto", "dali", "torch"),
         f"--backend must be auto, dali or torch, not {rt.backend!r}")
    need(0 <= rt.seed < 2 ** 63, f"--seed must be in [0, 2**63), not {rt.seed}")
    need(rt.log_every >= 1, f"--log-every must be at least 1, not {rt.log_every}")
    need(_folder_ok(rt.out), f"--out {rt.out}: a file is in the way of that folder; name a folder")
    need(rt.checkpoint_every >= 0,
         f"--checkpoint-every must be >= 0 (0 = by time only), not {rt.checkpoint_every}")
    need(rt.checkpoint_minutes > 0,
         f"--checkpoint-minutes must be positive, not {rt.checkpoint_minutes}")
    need(rt.name is None or re.fullmatch(r"[\w.+=-]+", rt.name) is not None and rt.name not in (".", ".."),
         f"--name {rt.name!r}: use letters, digits and . _ - + = (it names a folder)")


def _check_outputs(cfg, need) -> None:
    """predict's and evaluate's output paths: writable, and where they destroy nothing."""
    if isinstance(cfg, PredictConfig):
        _check_out_file(cfg.out_csv, "--out-csv", "predictions.csv", need)
        need(_writable(str(Path(cfg.out_csv).expanduser().parent)),
             f"--out-csv {cfg.out_csv}: its folder is not writable; name another place")
        # An X-ray, a DICOM, model.json or metrics.csv would be replaced by the table.
        need(_replaceable_csv(Path(cfg.out_csv).expanduser()),
             f"--out-csv {cfg.out_csv} exists and is not an earlier predictions file (its first "
             "line is not a `path,prediction,...` header): it would be replaced; name a new "
             "file")
        need(not _evaluations_table(Path(cfg.out_csv).expanduser()),
             f"--out-csv {cfg.out_csv} is the predictions.csv of an `sstl evaluate` folder (its "
             "metrics.json is beside it): replacing it would leave that evaluation inconsistent; "
             "name a new file, or evaluate again with --out")
        need(_folder_ok(cfg.cam), f"--cam {cfg.cam} is a file (or under one); name a folder "
             "for the overlays")
        if cfg.cam:
            cam = Path(cfg.cam).expanduser()
            # Earlier overlays would mix with these under the same numbers.
            need(not cam.is_dir() or not _holds_files(cam),
                 f"--cam {cfg.cam} already holds files (an earlier run's overlays?); name a "
                 "new or empty folder")
            for i in cfg.inputs:
                need(not _under(cam, i), f"--cam {cfg.cam} is inside the input {i}: a later "
                     "run on it would predict the overlays as X-rays; name a folder elsewhere")
    elif cfg.out:  # evaluate
        need(_folder_ok(cfg.out), f"--out {cfg.out} is a file (or under one); name a folder "
             "for the evaluation's files")
        need(_writable(cfg.out), f"--out {cfg.out}: that place is not writable (found now, "
             "not after the inference); name another folder")
        for f in ("model.json", "encoder.json", "config.json", "checkpoint.pt"):
            need(not (Path(cfg.out).expanduser() / f).exists(),
                 f"--out {cfg.out} is a run directory (it holds {f}): the evaluation would "
                 "replace its files; name another folder")
        other = _not_an_evaluation(Path(cfg.out).expanduser())
        need(other is None, f"--out {cfg.out} holds {other}, which no earlier evaluation "
             "wrote: the evaluation would write among (or over) it; name a new or empty "
             "folder, or an earlier evaluation's")
        # A manifest reads only the files it lists; a folder reads every image below it.
        folder = cfg.data.path and Path(cfg.data.path).expanduser().is_dir()
        need(not (folder and _under(cfg.out, cfg.data.path)),
             f"--out {cfg.out} is inside --data {cfg.data.path}: its figures would become "
             "images of that data set; name a folder elsewhere")


def _holds_files(folder: Path) -> bool:
    """Whether a folder holds anything but hidden files (.DS_Store); an unreadable one, too."""
    try:
        return any(not p.name.startswith(".") for p in folder.iterdir())
    except OSError:
        return True


def _under(path, folder) -> bool:
    """Whether `path` is `folder` or below it (both resolved: links and .. as the OS sees them)."""
    p, f = Path(path).expanduser().resolve(), Path(folder).expanduser().resolve()
    return f.is_dir() and (p == f or f in p.parents)


def _replaceable_csv(path: Path) -> bool:
    """Whether predictions may be written at `path`: nothing is there, or an earlier
    predict's or evaluate's table (its header starts `path,prediction,` or, evaluate's,
    `path,label,prediction,`; a manifest's starts `path,label,` too)."""
    try:
        with open(path, "rb") as fh:
            return fh.readline(4096).startswith((b"path,prediction,", b"path,label,prediction,"))
    except OSError:  # nothing there; or unreadable: the write will say why, replacing nothing
        return True


def _evaluations_table(path: Path) -> bool:
    """Whether `path` is an evaluation's predictions.csv (an evaluation's metrics.json is
    beside it): replaced alone, that metrics.json would describe other rows."""
    return path.name == "predictions.csv" and path.is_file() and _evaluation_record(path.parent)


def _not_an_evaluation(folder: Path) -> str | None:
    """The first entry of `folder` that keeps it from taking an evaluation's files, or None:
    a new or empty folder (hidden files aside), or an earlier evaluation's (its metrics.json
    names the model and the metrics; then only a predictions.csv not of sstl's blocks it).
    Anything else is the user's: X-rays there would be read as images by a later run."""
    if _evaluation_record(folder):
        return "predictions.csv" if not _replaceable_csv(folder / "predictions.csv") else None
    try:
        return next((p.name for p in sorted(folder.iterdir()) if not p.name.startswith(".")),
                    None)
    except OSError:  # nothing there, or unreadable: the write says why, replacing nothing
        return None


def _evaluation_record(folder: Path) -> bool:
    """Whether `folder` holds an evaluation's metrics.json (it names the model and the metrics)."""
    try:
        record = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and {"metrics", "model"} <= set(record)


def _writable(path: str) -> bool:
    """Whether a folder can be written at `path`: its nearest existing folder is writable
    (os.access: a read-only mount too)."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return os.access(p, os.W_OK)


def _folder_ok(path: str | None) -> bool:
    """Whether a folder can be (or is) at `path`: not a file, and under no file."""
    if path is None:
        return True
    p = Path(path).expanduser()
    return not any(q.is_file() for q in (p, *p.parents))


def _check_data(d: DataConfig, need) -> None:
    need(0 < d.test_fraction < 1, f"--test-fraction must be between 0 and 1, not {d.test_fraction}")
    need(0 <= d.split_seed < 2 ** 63, f"--split-seed must be in [0, 2**63), not {d.split_seed}")
    need(d.cache_size >= 32, f"--cache-size must be at least 32, not {d.cache_size}")
    need(d.scan_workers >= 0, f"--workers must be >= 0 (0 = all CPUs), not {d.scan_workers}")
    need(_folder_ok(d.cache_dir), f"--cache-dir {d.cache_dir}: a file is in the way of that "
         "folder; name a folder")
    need(d.cache_dir is not None or _folder_ok(str(default_cache_dir())),
         f"$SSTL_CACHE {default_cache_dir()}: a file is in the way of that folder; set it to "
         "a folder, or pass --cache-dir")


def size_warning(cfg) -> str | None:
    """A warning when the network's input is larger than the cached images: every view or
    image would be upsampled from them (no detail the cache did not keep), at the compute of
    the larger size. Not refused: a user may want it, e.g. a 224 px model from a 128 px set."""
    size, flag = cfg.augment.size, ("--view-size" if isinstance(cfg, PretrainConfig)
                                    else "--image-size")
    if size <= cfg.data.cache_size:
        return None
    return (f"warning: {flag} {size} is larger than --cache-size {cfg.data.cache_size}: every "
            f"input is upsampled from the {cfg.data.cache_size} px cache; pass --cache-size "
            f"{size} (or more) to train on the images' own detail")


def _check_settings(s, need) -> None:
    """Method settings: dimensions positive (a field's metadata "min" may allow 0, where the
    method gives 0 a meaning), rates in range (the names are the CLI's)."""
    for f in dataclasses.fields(s):
        v = getattr(s, f.name)
        if f.name == "tau":
            need(0 <= v < 1, f"--tau must be in [0, 1), not {v}")
        elif f.name == "temperature":
            need(v > 0, f"--temperature must be positive, not {v}")
        elif f.name == "target_bn":
            need(v in ("momentum", "batch"), f"--target-bn must be momentum or batch, not {v!r}")
        elif f.name in ("target_bn_momentum", "bank_momentum"):
            need(0 <= v < 1, f"{f.name} must be in [0, 1), not {v}")
        elif f.name == "lam":
            need(0 <= v <= 1, f"lam (PIRL's lambda) must be in [0, 1], not {v}")
        elif isinstance(v, int):
            low = f.metadata.get("min", 1)
            need(v >= low, f"{f.name.replace('_', '-')} must be "
                 f"{'positive' if low == 1 else f'at least {low}'}, not {v}")


# -------------------------------------------------------- values derived from the machine
@dataclass(frozen=True)
class Resolved:
    """Values derived from a config and the machine, computed in one place, saved with the run."""

    device: str  # cuda:N or cpu
    dtype: str  # autocast dtype: bfloat16 or float32
    compile: bool
    backend: str  # torch or dali
    rank: int
    world_size: int
    local_rank: int
    per_rank_batch: int
    channels_last: bool  # NHWC activations (oneDNN and cuDNN convolve them without reorders)
    graphs: bool = False  # CUDA graphs (engine/accel.py): CUDA, one process, not turned off

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        """The context the forward passes run in: bf16 autocast on CUDA, nothing in fp32."""
        if self.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.split(":")[0], dtype=getattr(torch, self.dtype))


def pick_device(device: str, local_rank: int = 0) -> str:
    """What --device means on this machine: cuda:LOCAL_RANK where asked for (or auto) and
    torch sees CUDA, else cpu; --device cuda without CUDA is refused."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA device")
    return f"cuda:{local_rank}" if device != "cpu" and torch.cuda.is_available() else "cpu"


def auto_precision(device: str) -> str:
    """What --precision auto means with this --device on this machine: bf16 on CUDA, else fp32."""
    return "bf16" if device != "cpu" and torch.cuda.is_available() else "fp32"


def resolve(rt: Runtime, batch_size: int, views: str = "two_crops") -> Resolved:
    """Turn the choices a runtime block leaves open ('auto') into values for this machine
    (and, for the data path, for the views a pretraining method asks for: Method.views).

    Under torchrun (WORLD_SIZE > 1) the batch stays the user's global one: per_rank_batch is
    its share, and the device is cuda:LOCAL_RANK."""
    rank, world, local_rank = dist_env()
    device = pick_device(rt.device, local_rank)
    on_gpu = device != "cpu"
    precision = rt.precision if rt.precision != "auto" else auto_precision(rt.device)
    if rt.cuda_graphs and not on_gpu:
        raise ConfigError("--cuda-graphs needs a CUDA device; this run is on the CPU")
    if batch_size % world:  # --batch-size is global: each of the processes takes a share
        raise ConfigError(f"--batch-size {batch_size} does not divide over the {world} processes "
                          f"of this run (WORLD_SIZE); use a multiple of {world}")
    return Resolved(device=device, dtype="bfloat16" if precision == "bf16" else "float32",
                    compile=on_gpu if rt.compile is None else bool(rt.compile),
                    backend=pick_backend(rt.backend, device, views), rank=rank, world_size=world,
                    local_rank=local_rank, per_rank_batch=batch_size // world,
                    # Also on the CPU: oneDNN's NHWC convolutions trained the resnet50 step
                    # at 112 px 1.37x faster, resnet18 at 64 px 1.10x (README, "The fast path").
                    channels_last=True,
                    # Not under torchrun: capturing DDP's all-reduces is not supported here.
                    graphs=on_gpu and world == 1 and rt.cuda_graphs is not False)


def inference_runtime(cfg) -> Runtime:
    """The runtime block of predict/evaluate, whose few runtime options are flat fields: one
    pass over a few images does not repay a compile, and single images take the torch path."""
    return Runtime(device=cfg.device, precision=cfg.precision, compile=False, backend="torch")
