"""The `sstl` command line. Each command fills one frozen config and hands it to the engine."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sstl.engine.config import AugmentConfig, DataConfig, PretrainConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Self-supervised transfer learning for chest X-rays (Li et al.): "
                       "pretrain, finetune, evaluate, predict, bench.")



@app.callback()
def main() -> None:
    """Self-supervised transfer learning for chest X-rays (Li et al.)."""


# Options shared by every command that reads data.
DATA = typer.Option(None, "--data", help="Folder (one sub-folder per class, or unlabelled images) "
                    "or manifest.csv. Omitted: the embedded SYNTHETIC demo set.")
CACHE_DIR = typer.Option(None, "--cache-dir", help="Decode-once cache [default: $SSTL_CACHE or ~/.cache/sstl]")
CACHE_SIZE = typer.Option(224, "--cache-size", help="Side of the cached uint8 images")
SPLIT_SEED = typer.Option(0, "--split-seed", help="Seed of the train/test split (keep it equal "
                          "between pretrain and finetune so the test images stay unseen)")
TEST_FRACTION = typer.Option(0.2, "--test-fraction", help="Held-out share (stratified, group-aware)")
WORKERS = typer.Option(0, "--workers", help="Decoder threads for the first scan [default: all CPUs]")
# Options shared by the training commands.
OUT = typer.Option(Path("runs"), "--out", help="Parent folder of run directories")
NAME = typer.Option(None, "--name", help="Run directory name [default: COMMAND-ARCH-TIME]")
IMAGENET_WEIGHTS = typer.Option("V2", "--imagenet-weights",
                                help="torchvision IMAGENET1K_V2, or V1 (the paper's era)")
DEVICE = typer.Option("auto", "--device", help="auto | cuda | cpu")
BACKEND = typer.Option("auto", "--backend", help="Data path: auto (DALI on a GPU if installed) | dali | torch")
COMPILE = typer.Option(None, "--compile/--no-compile", help="torch.compile [default: on for CUDA]")
PRECISION = typer.Option("auto", "--precision", help="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32")
LOG_EVERY = typer.Option(10, "--log-every", help="Steps between loss reads (the only host syncs)")
RESUME = typer.Option(True, "--resume/--no-resume", help="Continue from the run directory's checkpoint")


def data_config(data, cache_dir, cache_size, split_seed, test_fraction, workers=0) -> DataConfig:
    return DataConfig(path=str(data) if data else None, cache_dir=str(cache_dir) if cache_dir else None,
                      cache_size=cache_size, split_seed=split_seed, test_fraction=test_fraction,
                      scan_workers=workers)


@app.command()
def pretrain(
    data: Optional[Path] = DATA,
    out: Path = OUT,
    name: Optional[str] = NAME,
    epochs: int = typer.Option(40, help="Epochs (paper: 40)"),
    batch_size: int = typer.Option(256, help="Global batch size (paper: 256)"),
    view_size: int = typer.Option(112, help="Side of each augmented view (paper: 112)"),
    lr: float = typer.Option(0.03, help="SGD learning rate (paper: 0.03)"),
    momentum: float = typer.Option(0.9, help="SGD momentum (paper: 0.9)"),
    weight_decay: float = typer.Option(4e-4, help="Weight decay (paper: 4e-4)"),
    tau: float = typer.Option(0.996, help="Target EMA rate, every step (paper: 0.996)"),
    arch: str = typer.Option("resnet50", help="resnet50 (paper) | resnet18"),
    init: str = typer.Option("imagenet", help="imagenet | random | PATH to a state dict"),
    imagenet_weights: str = IMAGENET_WEIGHTS,
    target_bn: str = typer.Option("momentum", help="Target BN statistics: momentum | batch"),
    device: str = DEVICE,
    backend: str = BACKEND,
    compile: Optional[bool] = COMPILE,
    precision: str = PRECISION,
    seed: int = typer.Option(0, help="Training seed"),
    log_every: int = LOG_EVERY,
    checkpoint_every: int = typer.Option(200, help="Steps between checkpoints"),
    split: str = typer.Option("train", help="Images pretraining sees: train (the test split stays "
                              "unseen) | all (labels are never used, but finetune then warns)"),
    resume: bool = RESUME,
    cache_dir: Optional[Path] = CACHE_DIR,
    cache_size: int = CACHE_SIZE,
    split_seed: int = SPLIT_SEED,
    test_fraction: float = TEST_FRACTION,
    workers: int = WORKERS,
):
    """Self-supervised pretraining (the paper's stage 2): writes encoder.safetensors."""
    from sstl.engine.pretrain import pretrain as run

    cfg = PretrainConfig(
        data=data_config(data, cache_dir, cache_size, split_seed, test_fraction, workers),
        out=str(out), name=name, arch=arch, init=init, imagenet_weights=imagenet_weights,
        epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
        weight_decay=weight_decay, tau=tau, target_bn=target_bn,
        augment=AugmentConfig(size=view_size), device=device, backend=backend, compile=compile,
        precision=precision, seed=seed, log_every=log_every, checkpoint_every=checkpoint_every,
        resume=resume, split=split)
    run(cfg)


@app.command()
def finetune(
    data: Optional[Path] = DATA,
    encoder: Optional[Path] = typer.Option(None, help="encoder.safetensors from `sstl pretrain`, "
                                           "or its run directory (overrides --init)"),
    init: str = typer.Option("imagenet", help="Without --encoder: imagenet (the paper's Transfer) "
                             "| random (From Scratch) | PATH to a state dict"),
    imagenet_weights: str = IMAGENET_WEIGHTS,
    fraction: float = typer.Option(1.0, help="Share of the training split's labels used "
                                   "(paper: 0.01, 0.1, 0.5, 1); nested, stratified, group-aware"),
    positive_class: str = typer.Option("COVID", help="Positive class of Sen/Spe/HM/AUC"),
    out: Path = OUT,
    name: Optional[str] = NAME,
    arch: str = typer.Option("resnet50", help="resnet50 (paper) | resnet18; must match --encoder"),
    epochs: int = typer.Option(30, help="Epochs, each followed by a test evaluation (paper: 30)"),
    batch_size: int = typer.Option(64, help="Batch size (paper: not stated; see README)"),
    image_size: int = typer.Option(224, help="Side of the classifier's input (see README)"),
    lr: float = typer.Option(0.01, help="SGD peak learning rate (see README)"),
    schedule: str = typer.Option("cosine", help="cosine (per step, to 0) | constant"),
    momentum: float = typer.Option(0.9, help="SGD momentum"),
    weight_decay: float = typer.Option(1e-4, help="Weight decay"),
    label_smoothing: float = typer.Option(0.0, help="Cross-entropy label smoothing"),
    summary_last: int = typer.Option(10, help="Epochs averaged in summary.json (paper: last 10)"),
    device: str = DEVICE,
    backend: str = BACKEND,
    compile: Optional[bool] = COMPILE,
    precision: str = PRECISION,
    seed: int = typer.Option(0, help="Training seed (also picks the --fraction subset)"),
    log_every: int = LOG_EVERY,
    resume: bool = RESUME,
    cache_dir: Optional[Path] = CACHE_DIR,
    cache_size: int = CACHE_SIZE,
    split_seed: int = SPLIT_SEED,
    test_fraction: float = TEST_FRACTION,
    workers: int = WORKERS,
):
    """Supervised fine-tuning with the paper's protocol: metrics on the test split every epoch."""
    from sstl.engine.config import FinetuneAugment, FinetuneConfig
    from sstl.engine.finetune import finetune as run

    cfg = FinetuneConfig(
        data=data_config(data, cache_dir, cache_size, split_seed, test_fraction, workers),
        out=str(out), name=name, arch=arch, encoder=str(encoder) if encoder else None, init=init,
        imagenet_weights=imagenet_weights, fraction=fraction, epochs=epochs,
        batch_size=batch_size, lr=lr, schedule=schedule, momentum=momentum,
        weight_decay=weight_decay, label_smoothing=label_smoothing,
        augment=FinetuneAugment(size=image_size), positive_class=positive_class,
        summary_last=summary_last, device=device, backend=backend, compile=compile, precision=precision,
        seed=seed, log_every=log_every, resume=resume)
    run(cfg)


MODEL = typer.Option(..., "--model", help="Run directory of `sstl finetune` (or its model.safetensors)")


@app.command()
def predict(
    inputs: list[Path] = typer.Argument(..., help="Image files and/or folders (searched recursively)"),
    model: Path = MODEL,
    out_csv: Path = typer.Option(Path("predictions.csv"), help="Where the per-image CSV goes"),
    batch_size: int = typer.Option(64, help="Images per forward pass"),
    device: str = DEVICE,
    cam: Optional[Path] = typer.Option(None, "--cam", help="Also write a Grad-CAM overlay of the "
                                       "predicted class per image into this folder"),
):
    """Class probabilities for each image; unreadable files get an error row, the rest go on."""
    from sstl.engine.config import PredictConfig
    from sstl.engine.predict import predict as run

    run(PredictConfig(model=str(model), inputs=tuple(str(p) for p in inputs),
                      out_csv=str(out_csv), batch_size=batch_size, device=device,
                      cam=str(cam) if cam else None))


@app.command()
def evaluate(
    model: Path = MODEL,
    data: Optional[Path] = typer.Option(None, "--data", help="Labelled folder (one sub-folder per "
                                        "class) or manifest.csv; required"),
    split: str = typer.Option("all", help="all: every image of --data | test: its held-out split"),
    out: Optional[Path] = typer.Option(None, help="Also write metrics.json, predictions.csv and "
                                       "the figures into this folder"),
    batch_size: int = typer.Option(64, help="Images per forward pass"),
    device: str = DEVICE,
    cache_dir: Optional[Path] = CACHE_DIR,
    cache_size: int = CACHE_SIZE,
    split_seed: int = SPLIT_SEED,
    test_fraction: float = TEST_FRACTION,
    workers: int = WORKERS,
):
    """The paper's metrics of a fine-tuned model on a labelled folder or manifest."""
    if data is None:  # the synthetic demo set would give numbers that say nothing about X-rays
        raise SystemExit("sstl evaluate needs --data: a labelled folder (one sub-folder per "
                         "class) or a manifest.csv to evaluate the model on")
    from sstl.engine.config import EvaluateConfig
    from sstl.engine.predict import evaluate as run

    run(EvaluateConfig(model=str(model),
                       data=data_config(data, cache_dir, cache_size, split_seed, test_fraction,
                                        workers),
                       split=split, out=str(out) if out else None, batch_size=batch_size,
                       device=device))


from sstl.cli.bench import bench  # noqa: E402

app.command()(bench)

from sstl.cli.export import export  # noqa: E402

app.command()(export)

if __name__ == "__main__":
    app()
