"""The `sstl` command line. Each command fills one frozen config and hands it to the engine."""
from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer

from sstl.cli.paths import path_value
from sstl.engine.config import (DataConfig, EvaluateConfig, FinetuneConfig, PredictConfig,
                               PretrainConfig, ReproduceConfig, Runtime, SupervisedConfig)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Self-supervised transfer learning for chest X-rays (Li et al.): "
                       "supervised (stage 1), pretrain, finetune, reproduce (Table 2, Fig. 3), "
                       "evaluate, predict, export, bench, cache.")



def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"sstl {version('sstl')}")
        except PackageNotFoundError:
            typer.echo("sstl (not installed)")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                      help="Print the version and exit")) -> None:
    """Self-supervised transfer learning for chest X-rays (Li et al.)."""


def cli() -> None:
    """The `sstl` entry point: Ctrl-C outside the training loop ends with one line, exit 130."""
    warnings.showwarning = _show_warning
    try:
        app()
    except KeyboardInterrupt:
        _interrupted()
    except SystemExit as e:  # typer turns Ctrl-C in a command into a silent exit 130
        if e.code == 130 and _from_ctrl_c(e):
            _interrupted()
        raise


def _interrupted() -> None:
    """Exit 130 at once after Ctrl-C (the run directory's clean-up has already run). Not
    through the interpreter's teardown: a Ctrl-C that landed inside torch's C++ code
    aborted it, 1 in 6 measured ('terminate called without an active exception', rc -6)."""
    typer.echo("interrupted", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


def _from_ctrl_c(e: BaseException | None) -> bool:
    """Whether an exception was raised while handling a KeyboardInterrupt (typer's Exit(130))."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """sstl's own warnings (an undefined metric, say) as one line, like its other messages;
    those of the libraries below keep Python's form (file and line help their reports)."""
    if category.__module__.startswith("sstl."):
        typer.echo(f"warning: {message}", err=True)
    else:  # Python's own form
        (file or sys.stderr).write(warnings.formatwarning(message, category, filename, lineno,
                                                          line))


def default(cls, name: str):
    """A config field's default: the dataclasses are the one place defaults live."""
    return next(f for f in dataclasses.fields(cls) if f.name == name).default


D, R, P, F = DataConfig(), Runtime(), PretrainConfig, FinetuneConfig
RP, PR, EV = ReproduceConfig, PredictConfig, EvaluateConfig
# Options shared by every command that reads data.
DATA = typer.Option(None, "--data", help="Folder (one sub-folder per class, or unlabelled images) "
                    "or manifest.csv. Omitted: the embedded SYNTHETIC demo set.", parser=path_value)
CACHE_DIR = typer.Option(None, "--cache-dir", help="Decode-once cache \\[default: $SSTL_CACHE or ~/.cache/sstl]",
                         parser=path_value)
CACHE_SIZE = typer.Option(D.cache_size, "--cache-size", help="Side of the cached uint8 images")
SPLIT_SEED = typer.Option(D.split_seed, "--split-seed", help="Seed of the train/test split (keep "
                          "it equal between pretrain and finetune so the test images stay unseen)")
TEST_FRACTION = typer.Option(D.test_fraction, "--test-fraction",
                             help="Held-out share (stratified, group-aware)")
WORKERS = typer.Option(D.scan_workers, "--workers", show_default=False,
                       help="Decoder threads for the first scan \\[default: 0, all CPUs]")
# The runtime block, shared by the training commands.
OUT = typer.Option(Path(R.out), "--out", help="Parent folder of run directories", parser=path_value)
NAME = typer.Option(None, "--name", help="Run directory name \\[default: the command, arch (and "
                    "method, or start and fraction) and a digest of the settings, so the same "
                    "command resumes the same run]")
DEVICE = typer.Option(R.device, "--device", help="auto | cuda | cpu")
BACKEND = typer.Option(R.backend, "--backend", help="Data path: auto (DALI on a GPU if installed) | dali | torch")
COMPILE = typer.Option(None, "--compile/--no-compile", help="torch.compile \\[default: on for CUDA]")
GRAPHS = typer.Option(None, "--cuda-graphs/--no-cuda-graphs",
                      help="Replay the whole step as a CUDA graph \\[default: on for CUDA, one process]")
PRECISION = typer.Option(R.precision, "--precision", help="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32")
SEED = typer.Option(R.seed, "--seed", help="Training seed (init, order, augmentation, label subset)")
LOG_EVERY = typer.Option(R.log_every, "--log-every", help="Steps between loss reads (the only per-step host syncs)")
CKPT_EVERY = typer.Option(R.checkpoint_every, "--checkpoint-every",
                          help="Also checkpoint every N steps (0: by time and at the end only)")
CKPT_MINUTES = typer.Option(R.checkpoint_minutes, "--checkpoint-minutes",
                            help="Wall-clock minutes between checkpoints")
RESUME = typer.Option(R.resume, "--resume/--no-resume", help="Continue from the run directory's checkpoint")


def imagenet_weights_option(cls):
    return typer.Option(default(cls, "imagenet_weights"), "--imagenet-weights",
                        help="torchvision IMAGENET1K_ V1 (the paper's era) | V2 | auto: "
                        "the newest the arch has (resnet50 V2, resnet18 V1)")


def data_config(data, cache_dir, cache_size, split_seed, test_fraction, workers) -> DataConfig:
    return DataConfig(path=str(data) if data else None, cache_dir=str(cache_dir) if cache_dir else None,
                      cache_size=cache_size, split_seed=split_seed, test_fraction=test_fraction,
                      scan_workers=workers)


def runtime(device, precision, compile, backend, seed, out, name, log_every, checkpoint_every,
            checkpoint_minutes, resume, cuda_graphs) -> Runtime:
    return Runtime(device=device, precision=precision, compile=compile, backend=backend, seed=seed,
                   out=str(out), name=name, log_every=log_every, checkpoint_every=checkpoint_every,
                   checkpoint_minutes=checkpoint_minutes, resume=resume, cuda_graphs=cuda_graphs)


def method_options(tau, temperature, target_bn, proj_dim, options: list[str]) -> dict:
    """--tau/--temperature/--target-bn/--proj-dim and --method-option KEY=VALUE, as overrides."""
    out = {k: v for k, v in (("tau", tau), ("temperature", temperature), ("target_bn", target_bn),
                             ("proj_dim", proj_dim)) if v is not None}
    given = set()
    for item in options:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint="--method-option")
        key = key.strip().replace("-", "_")
        if key in out:  # two values for one setting: which one was meant cannot be guessed
            raise typer.BadParameter(
                f"{key} is given twice (" + ("--method-option twice" if key in given else
                                             f"--{key.replace('_', '-')} and --method-option")
                + ")", param_hint="--method-option")
        given.add(key)
        out[key] = value.strip()
    return out


@app.command()
def pretrain(
    data: Optional[Path] = DATA,
    method: str = typer.Option(default(P, "method"), help="cross (the paper) | byol | simsiam | "
                               "simclr | pirl-jigsaw | pirl-rotation"),
    epochs: int = typer.Option(default(P, "epochs"), help="Epochs (paper: 40)"),
    batch_size: int = typer.Option(default(P, "batch_size"), help="Global batch size (paper: 256)"),
    view_size: int = typer.Option(default(P, "augment").size, help="Side of each augmented view (paper: 112)"),
    lr: float = typer.Option(default(P, "lr"), help="SGD learning rate (paper: 0.03)"),
    momentum: float = typer.Option(default(P, "momentum"), help="SGD momentum (paper: 0.9)"),
    weight_decay: float = typer.Option(default(P, "weight_decay"), help="Weight decay (paper: 4e-4)"),
    arch: str = typer.Option(default(P, "arch"), help="resnet50 (paper) | resnet18"),
    init: str = typer.Option(default(P, "init"), help="imagenet | random | PATH to a state dict (or a run "
                              "directory: its encoder.safetensors)"),
    imagenet_weights: str = imagenet_weights_option(P),
    tau: Optional[float] = typer.Option(None, help="Target EMA rate (cross: 0.996 constant, the "
                                        "paper; byol: base of its cosine schedule, 0.996)"),
    temperature: Optional[float] = typer.Option(None, help="simclr: NT-Xent temperature (0.1) | "
                                                "pirl-*: NCE temperature (0.07)"),
    target_bn: Optional[str] = typer.Option(None, help="cross: target BN statistics, momentum | batch"),
    proj_dim: Optional[int] = typer.Option(None, help="Projector output size (method's default)"),
    method_option: list[str] = typer.Option([], "--method-option",
                                            help="Any other method setting, KEY=VALUE (README table)"),
    split: str = typer.Option(default(P, "split"), help="Images pretraining sees: train (the test "
                              "split stays unseen) | all (labels are never used; finetune warns)"),
    out: Path = OUT, name: Optional[str] = NAME, device: str = DEVICE, backend: str = BACKEND,
    compile: Optional[bool] = COMPILE, cuda_graphs: Optional[bool] = GRAPHS,
    precision: str = PRECISION, seed: int = SEED,
    log_every: int = LOG_EVERY, checkpoint_every: int = CKPT_EVERY,
    checkpoint_minutes: float = CKPT_MINUTES, resume: bool = RESUME,
    cache_dir: Optional[Path] = CACHE_DIR, cache_size: int = CACHE_SIZE,
    split_seed: int = SPLIT_SEED, test_fraction: float = TEST_FRACTION, workers: int = WORKERS,
):
    """Self-supervised pretraining (the paper's stage 2): writes encoder.safetensors."""
    from sstl.engine.pretrain import pretrain as run

    run(PretrainConfig(
        data=data_config(data, cache_dir, cache_size, split_seed, test_fraction, workers),
        runtime=runtime(device, precision, compile, backend, seed, out, name, log_every,
                        checkpoint_every, checkpoint_minutes, resume, cuda_graphs),
        method=method,  # no overrides: None, the method's defaults (as the config's default)
        settings=method_options(tau, temperature, target_bn, proj_dim, method_option) or None,
        arch=arch, init=init, imagenet_weights=imagenet_weights, epochs=epochs,
        batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
        augment=dataclasses.replace(default(P, "augment"), size=view_size), split=split))


@app.command()
def finetune(
    data: Optional[Path] = DATA,
    encoder: Optional[Path] = typer.Option(None, help="encoder.safetensors from `sstl pretrain`, "
                                           "or its run directory (overrides --init)",
                                           parser=path_value),
    init: str = typer.Option(default(F, "init"), help="Without --encoder: imagenet (the paper's "
                             "Transfer) | random (From Scratch) | PATH to a state dict "
                             "or a run directory"),
    imagenet_weights: str = imagenet_weights_option(F),
    fraction: float = typer.Option(default(F, "fraction"), help="Share of the training split's "
                                   "labels used (paper: 0.01, 0.1, 0.5, 1); nested, stratified"),
    positive_class: str = typer.Option(default(F, "positive_class"), help="Positive class of Sen/Spe/HM/AUC"),
    arch: str = typer.Option(default(F, "arch"), help="resnet50 (paper) | resnet18; must match --encoder"),
    epochs: int = typer.Option(default(F, "epochs"), help="Epochs, each followed by a test evaluation (paper: 30)"),
    batch_size: int = typer.Option(default(F, "batch_size"), help="Batch size (paper: not stated; see README)"),
    image_size: int = typer.Option(default(F, "augment").size, help="Side of the classifier's input (see README)"),
    lr: float = typer.Option(default(F, "lr"), help="SGD peak learning rate (see README)"),
    schedule: str = typer.Option(default(F, "schedule"), help="cosine (per step, to 0) | constant"),
    momentum: float = typer.Option(default(F, "momentum"), help="SGD momentum"),
    weight_decay: float = typer.Option(default(F, "weight_decay"), help="Weight decay"),
    label_smoothing: float = typer.Option(default(F, "label_smoothing"), help="Cross-entropy label smoothing"),
    summary_last: int = typer.Option(default(F, "summary_last"), help="Epochs averaged in summary.json (paper: last 10)"),
    out: Path = OUT, name: Optional[str] = NAME, device: str = DEVICE, backend: str = BACKEND,
    compile: Optional[bool] = COMPILE, cuda_graphs: Optional[bool] = GRAPHS,
    precision: str = PRECISION, seed: int = SEED,
    log_every: int = LOG_EVERY, checkpoint_every: int = CKPT_EVERY,
    checkpoint_minutes: float = CKPT_MINUTES, resume: bool = RESUME,
    cache_dir: Optional[Path] = CACHE_DIR, cache_size: int = CACHE_SIZE,
    split_seed: int = SPLIT_SEED, test_fraction: float = TEST_FRACTION, workers: int = WORKERS,
):
    """Supervised fine-tuning with the paper's protocol: metrics on the test split every epoch."""
    from sstl.engine.finetune import finetune as run

    run(FinetuneConfig(
        data=data_config(data, cache_dir, cache_size, split_seed, test_fraction, workers),
        runtime=runtime(device, precision, compile, backend, seed, out, name, log_every,
                        checkpoint_every, checkpoint_minutes, resume, cuda_graphs),
        arch=arch, encoder=str(encoder) if encoder else None, init=init,
        imagenet_weights=imagenet_weights, fraction=fraction, epochs=epochs,
        batch_size=batch_size, lr=lr, schedule=schedule, momentum=momentum,
        weight_decay=weight_decay, label_smoothing=label_smoothing,
        augment=dataclasses.replace(default(F, "augment"), size=image_size), positive_class=positive_class,
        summary_last=summary_last))


S = SupervisedConfig


@app.command()
def supervised(
    data: Path = typer.Option(..., "--data", help="Class folders (or manifest) of labelled natural "
                              "images: ImageNet, or CIFAR-10 where ImageNet weights cannot be had",
                              parser=path_value),
    arch: str = typer.Option(default(S, "arch"), help="resnet50 (paper) | resnet18"),
    init: str = typer.Option(default(S, "init"), help="random | imagenet | PATH (a state dict or a run "
                              "directory)"),
    imagenet_weights: str = typer.Option(default(S, "imagenet_weights"), "--imagenet-weights",
                                         help="V1 | V2 | auto: the newest the arch has "
                                         "(resnet50 V2, resnet18 V1)"),
    epochs: int = typer.Option(default(S, "epochs"), help="Epochs (ImageNet recipe: 90)"),
    batch_size: int = typer.Option(default(S, "batch_size"), help="Batch size"),
    image_size: int = typer.Option(default(S, "augment").size, help="Side of the input (CIFAR-10: 32)"),
    lr: float = typer.Option(default(S, "lr"), help="SGD peak learning rate"),
    schedule: str = typer.Option(default(S, "schedule"), help="cosine | constant"),
    momentum: float = typer.Option(default(S, "momentum"), help="SGD momentum"),
    weight_decay: float = typer.Option(default(S, "weight_decay"), help="Weight decay"),
    label_smoothing: float = typer.Option(default(S, "label_smoothing"),
                                          help="Cross-entropy label smoothing"),
    out: Path = OUT, name: Optional[str] = NAME, device: str = DEVICE, backend: str = BACKEND,
    compile: Optional[bool] = COMPILE, cuda_graphs: Optional[bool] = GRAPHS,
    precision: str = PRECISION, seed: int = SEED,
    log_every: int = LOG_EVERY, checkpoint_every: int = CKPT_EVERY,
    checkpoint_minutes: float = CKPT_MINUTES, resume: bool = RESUME,
    cache_dir: Optional[Path] = CACHE_DIR,
    cache_size: int = typer.Option(default(S, "data").cache_size, "--cache-size",
                                   help="Side of the cached uint8 images"),
    split_seed: int = SPLIT_SEED, test_fraction: float = TEST_FRACTION, workers: int = WORKERS,
):
    """The paper's stage 1: supervised training on natural images; writes encoder.safetensors."""
    from sstl.engine.supervised import supervised as run

    aug = dataclasses.replace(default(S, "augment"), size=image_size)
    run(SupervisedConfig(
        data=data_config(data, cache_dir, cache_size, split_seed, test_fraction, workers),
        runtime=runtime(device, precision, compile, backend, seed, out, name, log_every,
                        checkpoint_every, checkpoint_minutes, resume, cuda_graphs),
        arch=arch, init=init, imagenet_weights=imagenet_weights, epochs=epochs,
        batch_size=batch_size, lr=lr, schedule=schedule, momentum=momentum,
        weight_decay=weight_decay, label_smoothing=label_smoothing, augment=aug))


@app.command()
def reproduce(
    data: Optional[Path] = DATA,
    preset: str = typer.Option(default(RP, "preset"), help="paper (resnet50, the paper's settings; a GPU job) | "
                               "quick (resnet18, small images, few epochs; a CPU job)"),
    rows: list[str] = typer.Option([], "--row", help="Only these rows (repeatable): ours, transfer, "
                                   "cross, byol, simsiam, simclr, pirl-jigsaw, pirl-rotation, "
                                   "scratch \\[default: all]"),
    fraction: list[float] = typer.Option([], "--fraction", help="Label fractions (repeatable) "
                                         "\\[default: 0.01 0.1 0.5 1]"),
    seeds: int = typer.Option(default(RP, "seeds"), help="Seeds per cell; tables give mean and std across them"),
    transfer: str = typer.Option(default(RP, "transfer"), help="Start of Ours and Transfer: imagenet | PATH to "
                                 "a stage-1 encoder (`sstl supervised`) or its run directory"),
    evaluate_on: Optional[Path] = typer.Option(None, help="Also evaluate every fine-tuned model "
                                               "on this labelled set (another hospital's data)",
                                               parser=path_value),
    positive_class: str = typer.Option(default(F, "positive_class"),
                                       help="Positive class of Sen/Spe/HM/AUC"),
    out: Path = OUT,
    name: Optional[str] = typer.Option(None, "--name", help="Grid folder under --out \\[default: "
                                       "reproduce-<preset>]; a grid made with other settings "
                                       "is refused, not mixed in"),
    device: str = DEVICE, backend: str = BACKEND,
    compile: Optional[bool] = COMPILE, cuda_graphs: Optional[bool] = GRAPHS,
    precision: str = PRECISION,
    seed: int = typer.Option(R.seed, "--seed", help="The first seed; --seeds N runs seed, "
                             "seed+1, ... (init, order, augmentation, label subset)"),
    log_every: int = LOG_EVERY, cache_dir: Optional[Path] = CACHE_DIR,
    split_seed: int = SPLIT_SEED, test_fraction: float = TEST_FRACTION, workers: int = WORKERS,
):
    """Table 2 and Fig. 3: every row x label fraction as ordinary runs, collected into tables."""
    from sstl.engine.config import ReproduceConfig
    from sstl.engine.reproduce import reproduce as run

    run(ReproduceConfig(
        data=data_config(data, cache_dir, D.cache_size, split_seed, test_fraction, workers),
        runtime=runtime(device, precision, compile, backend, seed, out, name, log_every,
                        R.checkpoint_every, R.checkpoint_minutes, True, cuda_graphs),
        preset=preset, rows=tuple(rows), fractions=tuple(fraction) or ReproduceConfig().fractions,
        seeds=seeds, transfer=transfer, evaluate_on=str(evaluate_on) if evaluate_on else None,
        positive_class=positive_class))


MODEL = typer.Option(..., "--model", help="Run directory of `sstl finetune` (or its model.safetensors)",
                     parser=path_value)


THRESHOLD = typer.Option(None, "--threshold", help="Predict the positive class (model.json's, "
                         "e.g. COVID) wherever its probability is at least this (an operating "
                         "point: lower for screening); default: the most probable class")


@app.command()
def predict(
    inputs: list[Path] = typer.Argument(..., help="Image files and/or folders (searched recursively)",
                                        parser=path_value),
    model: Path = MODEL,
    out_csv: Path = typer.Option(Path(default(PR, "out_csv")), help="Where the per-image CSV goes",
                                 parser=path_value),
    batch_size: int = typer.Option(default(PR, "batch_size"), help="Images per forward pass"),
    device: str = DEVICE,
    precision: str = PRECISION,
    cam: Optional[Path] = typer.Option(None, "--cam", help="Also write a Grad-CAM overlay of the "
                                       "predicted class per image into this folder",
                                       parser=path_value),
    threshold: Optional[float] = THRESHOLD,
):
    """Class probabilities for each image; unreadable files get an error row, the rest go on."""
    from sstl.engine.config import PredictConfig
    from sstl.engine.predict import predict as run

    run(PredictConfig(model=str(model), inputs=tuple(str(p) for p in inputs),
                      out_csv=str(out_csv), batch_size=batch_size, device=device,
                      precision=precision, cam=str(cam) if cam else None,
                      threshold=threshold))


@app.command()
def evaluate(
    model: Path = MODEL,
    data: Optional[Path] = typer.Option(None, "--data", help="Labelled folder (one sub-folder per "
                                        "class) or manifest.csv; required", parser=path_value),
    split: str = typer.Option(default(EV, "split"), help="all: every image of --data | test: its held-out "
                              "split (images the model learned from are always left out)"),
    out: Optional[Path] = typer.Option(None, help="Also write metrics.json, predictions.csv and "
                                       "the figures into this folder", parser=path_value),
    batch_size: int = typer.Option(default(EV, "batch_size"), help="Images per forward pass"),
    device: str = DEVICE,
    precision: str = PRECISION,
    cache_dir: Optional[Path] = CACHE_DIR,
    cache_size: Optional[int] = typer.Option(
        None, "--cache-size", help="Side images are decoded to; default: the model's own "
        "(model.json), as training and `sstl predict` decode them"),
    split_seed: int = typer.Option(D.split_seed, "--split-seed", help="With --split test: the "
                                   "seed the model's training split used (model.json)"),
    test_fraction: float = TEST_FRACTION,
    workers: int = WORKERS,
    threshold: Optional[float] = THRESHOLD,
):
    """The paper's metrics of a fine-tuned model on a labelled folder or manifest."""
    # A command-line policy, not the engine's: the synthetic demo set (which the engine, and
    # the tests, may evaluate on) would give a user numbers that say nothing about X-rays.
    if data is None:
        raise SystemExit("sstl evaluate needs --data: a labelled folder (one sub-folder per "
                         "class) or a manifest.csv to evaluate the model on")
    from sstl.engine.config import EvaluateConfig
    from sstl.engine.predict import evaluate as run

    run(EvaluateConfig(model=str(model),
                       data=data_config(data, cache_dir, cache_size, split_seed, test_fraction,
                                        workers),
                       split=split, out=str(out) if out else None, batch_size=batch_size,
                       device=device, precision=precision, threshold=threshold))


from sstl.cli.bench import bench  # noqa: E402

app.command()(bench)

from sstl.cli.export import export  # noqa: E402

app.command()(export)

from sstl.cli.cache import cache  # noqa: E402

app.command()(cache)

if __name__ == "__main__":
    cli()
