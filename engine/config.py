"""Frozen configuration: one dataclass per command, a comment per field.

The CLI only fills these. Values that depend on the machine or the data (the device, the
dtype, the backend actually used, steps per epoch) are computed once in `resolve()` and saved
with the run beside the config itself; the config is never mutated after parsing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

# ImageNet statistics: the backbone starts from ImageNet weights, so its inputs keep them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViewAugment:
    """How one view is drawn from a grayscale image. Probabilities are per sample."""

    crop_scale: tuple[float, float] = (0.2, 1.0)  # area fraction of the random resized crop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect-ratio range of the crop
    flip_p: float = 0.5  # horizontal flip
    blur_p: float = 0.5  # Gaussian blur
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # sigma range, in pixels of the output view
    jitter_p: float = 0.8  # brightness/contrast jitter
    brightness: float = 0.4  # factor drawn from [1 - b, 1 + b]
    contrast: float = 0.4  # factor drawn from [1 - c, 1 + c], around the view's mean


@dataclass(frozen=True)
class AugmentConfig:
    """Both views' settings side by side. The torch and DALI backends read only this.

    BYOL's asymmetry (blur always on one view, rarely on the other) is kept; colour
    saturation/hue and solarisation are dropped because radiographs are grey.
    """

    size: int = 112  # output side of each view, pixels (the paper's 112x112)
    view1: ViewAugment = ViewAugment(blur_p=1.0)
    view2: ViewAugment = ViewAugment(blur_p=0.1)

    def views(self) -> tuple[ViewAugment, ViewAugment]:
        return (self.view1, self.view2)


@dataclass(frozen=True)
class FinetuneAugment:
    """The fine-tuning view: a mild crop, flip and jitter; evaluation is a plain resize.

    Milder than pretraining's views: the labels must survive the crop (a 60% crop still
    holds both lungs), and there is no blur, which would erase the fine opacities that
    separate the classes.
    """

    size: int = 224  # side of the classifier's input (--image-size); the files are 224x224
    train: ViewAugment = ViewAugment(crop_scale=(0.6, 1.0), flip_p=0.5, blur_p=0.0, jitter_p=0.5,
                                     brightness=0.2, contrast=0.2)


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
class PretrainConfig:
    """`sstl pretrain`: the paper's self-supervised stage (defaults are the paper's)."""

    data: DataConfig = DataConfig()
    out: str = "runs"  # parent folder of run directories
    name: str | None = None  # run directory name; None = pretrain-<arch>-<timestamp>
    arch: str = "resnet50"  # resnet50 (paper) or resnet18 (small runs)
    init: str = "imagenet"  # imagenet | random | PATH to a state dict (.pth/.safetensors)
    imagenet_weights: str = "V2"  # torchvision IMAGENET1K_V2 (default) or V1 (the paper's era)
    epochs: int = 40  # paper: 40
    batch_size: int = 256  # paper: 256 (global, across all processes)
    lr: float = 0.03  # paper: SGD lr 0.03 (constant)
    momentum: float = 0.9  # paper: 0.9
    weight_decay: float = 4e-4  # paper: 4e-4
    tau: float = 0.996  # paper: target EMA rate, applied after every optimizer step
    proj_hidden: int = 512  # projector 2048 -> 512 -> 128
    proj_dim: int = 128  # projector output; the predictor outputs the same (see README)
    pred_hidden: int = 4096  # predictor hidden units (paper)
    target_bn: str = "momentum"  # momentum: target BN uses momentum statistics; batch: plain
    target_bn_momentum: float = 0.99  # weight of the old statistic in the target's momentum BN
    augment: AugmentConfig = AugmentConfig()
    device: str = "auto"  # auto | cuda | cpu
    backend: str = "auto"  # data path: auto (DALI if importable and on a GPU) | dali | torch
    compile: bool | None = None  # torch.compile the networks; None = on for CUDA, off for CPU
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    seed: int = 0  # training randomness (init of heads, order, augmentation)
    log_every: int = 10  # steps between host reads of the loss (the only syncs in the loop)
    checkpoint_every: int = 200  # steps between atomic checkpoints (also at every epoch end)
    resume: bool = True  # continue from the run directory's checkpoint when it has one
    split: str = "train"  # which split pretraining sees: train (default) | all


@dataclass(frozen=True)
class FinetuneConfig:
    """`sstl finetune`: supervised fine-tuning and the paper's evaluation protocol.

    The paper states 30 epochs and an evaluation on the test split after every epoch; the
    optimizer, schedule, batch and image size it leaves open are chosen in the README.
    """

    data: DataConfig = DataConfig()
    out: str = "runs"  # parent folder of run directories
    name: str | None = None  # run directory name; None = finetune-<arch>-<timestamp>
    arch: str = "resnet50"  # must match the encoder's arch when --encoder is given
    encoder: str | None = None  # encoder.safetensors from `sstl pretrain` (or its run dir)
    init: str = "imagenet"  # used without --encoder: imagenet ("Transfer") | random ("From Scratch")
    imagenet_weights: str = "V2"  # torchvision IMAGENET1K_V2 or V1
    fraction: float = 1.0  # share of the training split's labels used (paper: 0.01/0.1/0.5/1)
    epochs: int = 30  # paper: 30, evaluated on the test split after every epoch
    batch_size: int = 64  # not stated by the paper; see README
    lr: float = 0.01  # SGD peak learning rate; not stated by the paper; see README
    schedule: str = "cosine"  # cosine (per step, from --lr down to 0 at the end) | constant
    momentum: float = 0.9  # SGD momentum, as in pretraining
    weight_decay: float = 1e-4  # the usual ResNet value; the head and BN are decayed too
    label_smoothing: float = 0.0  # cross-entropy label smoothing (0 = plain cross-entropy)
    augment: FinetuneAugment = FinetuneAugment()
    positive_class: str = "COVID"  # the positive class of sensitivity/specificity/AUC
    summary_last: int = 10  # Table 2 reports mean and std over the last 10 epochs
    device: str = "auto"  # auto | cuda | cpu
    backend: str = "auto"  # data path: auto (DALI if importable and on a GPU) | dali | torch
    compile: bool | None = None  # torch.compile the classifier; None = on for CUDA, off for CPU
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    seed: int = 0  # head init, data order, augmentation and the --fraction subset
    log_every: int = 10  # steps between host reads of the loss (the only syncs in the loop)
    resume: bool = True  # continue from the run directory's checkpoint (epoch boundary)


@dataclass(frozen=True)
class PredictConfig:
    """`sstl predict`: class probabilities for image files and folders."""

    model: str  # run directory of `sstl finetune`, or its model.safetensors
    inputs: tuple[str, ...]  # image files and folders (folders are searched recursively)
    out_csv: str = "predictions.csv"  # one row per image; default in the current folder
    batch_size: int = 64  # images per forward pass
    device: str = "auto"  # auto | cuda | cpu
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    compile: bool = False  # one pass over a few images does not repay a compile
    backend: str = "torch"  # the only view path for single images
    cam: str | None = None  # folder for Grad-CAM overlays; None = none


@dataclass(frozen=True)
class EvaluateConfig:
    """`sstl evaluate`: the paper's metrics of a fine-tuned model on any labelled data."""

    model: str  # run directory of `sstl finetune`, or its model.safetensors
    data: DataConfig = DataConfig()  # labelled folder or manifest; its split settings for --split
    split: str = "all"  # all: every image | test: the held-out split of `data`
    out: str | None = None  # folder for metrics.json, predictions.csv and the figures; None = none
    batch_size: int = 64
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    backend: str = "torch"


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_hash(cfg) -> str:
    """A short stable fingerprint of a config (or its dict), stored with what is made from it."""
    blob = json.dumps(cfg if isinstance(cfg, dict) else to_dict(cfg), sort_keys=True,
                      default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


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
    channels_last: bool

    def autocast(self):
        """The context the forward passes run in: bf16 autocast on CUDA, nothing in fp32."""
        if self.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.split(":")[0], dtype=getattr(torch, self.dtype))


def dist_env() -> tuple[int, int, int]:
    """Rank, world size and local rank: the one place they come from (torchrun's variables)."""
    import os

    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def resolve(cfg) -> Resolved:
    """Turn the choices a config leaves open ('auto') into concrete values for this machine."""
    rank, world, local_rank = dist_env()
    if world > 1:  # refuse rather than train N unsynchronised copies into one run directory
        raise SystemExit(f"WORLD_SIZE={world}: multi-process (torchrun/DDP) training is not "
                         "supported yet; run a single process")
    if cfg.device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    elif cfg.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda was asked for, but torch sees no CUDA device.")
        device = f"cuda:{local_rank}"
    elif cfg.device == "cpu":
        device = "cpu"
    else:
        raise SystemExit(f"--device must be auto, cuda or cpu, not {cfg.device!r}")
    on_gpu = device.startswith("cuda")
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if on_gpu else "fp32")
    if precision not in ("bf16", "fp32"):
        raise SystemExit(f"--precision must be auto, bf16 or fp32, not {cfg.precision!r}")
    compile_ = on_gpu if cfg.compile is None else bool(cfg.compile)
    from .data.backends import pick_backend  # late: the data package imports this module

    backend = pick_backend(cfg.backend, device)
    if cfg.batch_size % world:
        raise SystemExit(f"--batch-size {cfg.batch_size} does not divide over {world} processes")
    return Resolved(device=device, dtype="bfloat16" if precision == "bf16" else "float32",
                    compile=compile_, backend=backend, rank=rank, world_size=world,
                    local_rank=local_rank, per_rank_batch=cfg.batch_size // world,
                    channels_last=on_gpu)


def save_json(obj, path: Path) -> None:
    """Write JSON atomically: a temporary name, then rename (never a half-written file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)
