"""Backbones (torchvision ResNets, with their ImageNet start) and the small heads on them."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

from .io import first_line

ARCHS = {"resnet18": 512, "resnet50": 2048}  # backbone -> feature dimension
NAMED_STARTS = ("imagenet", "random")  # --init values that name no file


def is_start_file(init: str | None) -> bool:
    """Whether a start (--init, a recorded `init`) is a path: not None, imagenet or random."""
    return init not in (None, *NAMED_STARTS)


def mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    """Linear, BN, ReLU, Linear: BYOL's projector and predictor shape."""
    return nn.Sequential(nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden),
                         nn.ReLU(inplace=True), nn.Linear(hidden, d_out))


def backbone(arch: str, init: str = "random", weights: str | None = None,
             flag: str = "--init") -> nn.Module:
    """A ResNet whose forward returns pooled features (fc replaced by Identity).

    init: "random", "imagenet" (torchvision's IMAGENET1K_<weights>; `weights` is then the
    config's --imagenet-weights) or a path to a state dict; `flag` names the option the path
    came from in error messages.
    """
    if arch not in ARCHS:
        raise SystemExit(f"--arch must be one of {', '.join(ARCHS)}, not {arch!r}")
    net = getattr(torchvision.models, arch)()
    if init == "imagenet":
        assert weights is not None, "an ImageNet start names its weights (V1 or V2)"
        state = imagenet_state_dict(arch, weights)
        try:
            net.load_state_dict(state)
        except RuntimeError as e:  # the expected file name holding other weights
            first = str(e).strip().splitlines()[0]
            raise SystemExit(f"--init imagenet: {imagenet_file(arch, weights)} does not hold "
                             f"torchvision's {arch} weights ({first}); replace it with the "
                             "download named there, or delete it") from None
    elif init != "random":
        load_backbone_file(net, init, flag)
    net.fc = nn.Identity()
    return net


def imagenet_versions(arch: str) -> tuple[str, ...]:
    """The --imagenet-weights values torchvision has for `arch`: ("V1",) for resnet18."""
    return tuple(w.name.removeprefix("IMAGENET1K_")
                 for w in torchvision.models.get_model_weights(arch))


def imagenet_weights_enum(arch: str, version: str):
    """torchvision's IMAGENET1K_<version> weights entry for `arch`, or one line naming the flag."""
    enum = torchvision.models.get_model_weights(arch)
    name = f"IMAGENET1K_{version.upper()}"
    if not hasattr(enum, name):
        raise SystemExit(f"{arch} has no {name} weights in torchvision; pass --imagenet-weights "
                         f"{' or '.join(imagenet_versions(arch))}")
    return getattr(enum, name)


def imagenet_tag(start: str, version: str) -> str | None:
    """Which torchvision ImageNet weights a start used ("IMAGENET1K_V2"), for the sidecars
    and the model card; None when the start is not torchvision's ImageNet weights."""
    return f"IMAGENET1K_{version.upper()}" if start == "imagenet" else None


def imagenet_file(arch: str, version: str) -> Path:
    """Where torchvision keeps (or downloads) those weights: TORCH_HOME's hub/checkpoints."""
    w = imagenet_weights_enum(arch, version)
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)


def imagenet_state_dict(arch: str, version: str, flag: str = "--init") -> dict:
    """torchvision's ImageNet weights, from its cache or a download, with a clear failure.

    Read with weights_only=True (torchvision's own loader unpickles freely, and the file's
    place is one users fill by hand); a download is checked against the hash in its name."""
    w, f = imagenet_weights_enum(arch, version), imagenet_file(arch, version)
    name, fname, hub = w.name, f.name, f.parent
    try:
        return torch.hub.load_state_dict_from_url(w.url, progress=False, check_hash=True,
                                                  map_location="cpu", weights_only=True)
    except Exception as e:  # offline, proxy, truncated download, not a plain state dict...
        raise SystemExit(
            f"{flag} imagenet needs torchvision's {arch} {name} weights, file {fname}, and they "
            f"could not be loaded ({type(e).__name__}: {e}).\n"
            f"On a machine without internet, download {w.url}\n"
            f"and put it at {hub / fname} (or set TORCH_HOME), or pass {flag} PATH to a local "
            f"state dict" + (", or --init random." if flag == "--init" else ".")) from None


def _why_unreadable(p: Path, e: Exception) -> str:
    """Why a weights file failed to load, in words a user can act on (torch's own advice,
    to load with weights_only=False, is the code-execution path sstl never takes)."""
    try:
        with open(p, "rb") as fh:
            head = fh.read(9)
    except OSError as err:
        return first_line(err)
    n = int.from_bytes(head[:8], "little")  # safetensors: the header's length, then its JSON
    if p.suffix != ".safetensors" and head[8:9] == b"{" and 0 < n <= p.stat().st_size - 8:
        return "it looks like a safetensors file: name it .safetensors"
    if p.suffix != ".safetensors" and head[:4] != b"PK\x03\x04" and head[:1] != b"\x80":
        return "the file is neither torch.save's format (.pth/.pt) nor safetensors"
    if str(e).startswith("Weights only load failed"):
        return ("it holds Python objects beyond tensors and numbers, which sstl never "
                "unpickles (a crafted file could run code); save the state_dict() alone "
                "(torch.save) or as .safetensors")
    return first_line(e)


def _strip(key: str) -> str:
    """Remove wrapper prefixes in any order and number (`module._orig_mod.encoder.` ...)."""
    prefixes = ("_orig_mod.", "module.", "backbone.", "encoder.")
    while key.startswith(prefixes):
        key = key[key.index(".") + 1:]
    return key


def load_backbone_file(net: nn.Module, path: str, flag: str = "--init") -> None:
    """Load a local state dict (.pth/.pt or .safetensors) into a torchvision ResNet.

    Wrapper prefixes (`module.`, `_orig_mod.`, `backbone.`, `encoder.`) are removed and a
    classifier (`fc.`, or sstl's `head.`: a fine-tuned model.safetensors works) is ignored; every backbone weight must be present, or the error lists what is missing.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise SystemExit(f"{flag} {path}: no such file (expected a state dict .pth or "
                         ".safetensors, or 'imagenet' / 'random')")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:  # weights_only: a crafted pickle cannot run code, it fails to load
            sd = torch.load(p, map_location="cpu", weights_only=True)
            sd = sd.get("state_dict", sd.get("model", sd)) if isinstance(sd, dict) else sd
    except Exception as e:
        raise SystemExit(f"{flag} {path}: not a readable state dict: {_why_unreadable(p, e)}"
                         ) from None
    if not isinstance(sd, dict):
        raise SystemExit(f"{flag} {path}: holds a {type(sd).__name__}, not a state dict")
    sd = {_strip(k): v for k, v in sd.items() if not _strip(k).startswith(("fc.", "head."))}
    try:
        missing, unexpected = net.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches: another architecture's weights
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise SystemExit(f"{flag} {path} does not fit a {type(net).__name__} of this --arch "
                         f"(weights of another architecture?): {first}") from None
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise SystemExit(f"{flag} {path} does not fit {type(net).__name__}: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")


class Classifier(nn.Module):
    """Backbone + linear head, for fine-tuning."""

    def __init__(self, encoder: nn.Module, feat_dim: int, n_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(feat_dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def weights_file(path: str | os.PathLike, default_name: str, give: str | None = None,
                 flag: str = "") -> Path:
    """A weights file named directly, or `default_name` inside the run directory named.
    `give`: only sstl's .safetensors will do, and this says what to give instead (`flag`
    names the option, in the message)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise SystemExit(f"{flag + ' ' if flag else ''}{path}: no such file or folder")
    if p.is_dir():
        p = p / default_name
    if not p.is_file():
        raise SystemExit(f"{path}: no {default_name} there (give the file or its run directory)")
    if give is not None and p.suffix != ".safetensors":  # an image, a .pth, model.json...
        raise SystemExit(f"{flag + ' ' if flag else ''}{path}: not a .safetensors file; "
                         f"give {give}")
    return p


def sidecar(weights: Path) -> dict:
    """The JSON written beside a .safetensors file by engine.record.save_weights."""
    import json

    meta = weights.with_suffix(".json")
    if not meta.is_file():
        raise SystemExit(f"{weights}: its sidecar {meta.name} is missing (it holds the arch, "
                         "the classes and the data split); copy it along with the weights")
    try:
        got = json.loads(meta.read_text())
    except (ValueError, OSError) as e:  # cut short, edited, or another file under its name
        raise SystemExit(f"{meta}: not a readable sidecar ({type(e).__name__}: "
                         f"{str(e)[:120]}); copy it again with its weights from the run") from None
    if not isinstance(got, dict):
        raise SystemExit(f"{meta}: not a sidecar (a JSON object was expected)")
    return got


def sstl_weights(init: str | None) -> Path | None:
    """The weights file of a start sstl wrote (a .safetensors beside its JSON sidecar, or its
    run directory), or None: imagenet, random and other files record nothing of what they saw."""
    if not is_start_file(init):
        return None
    f = weights_file(init, "encoder.safetensors")
    return f if f.suffix == ".safetensors" and f.with_suffix(".json").is_file() else None


def start_sidecar(init: str | None) -> dict:
    """The sidecar of a start sstl wrote (--init PATH): what it learned from (learned_images)
    goes into the new weights' own sidecar, so the leak checks follow weights through every
    stage. {} for imagenet, random, or files sstl did not write."""
    f = sstl_weights(init)
    return sidecar(f) if f is not None else {}


def learned_images(meta: dict) -> set[str]:
    """The images a sidecar's weights count as trained on, for the leak checks: `trained_on`,
    but none for a --split all pretraining (every image, unlabelled), which finetune warns
    about instead of refusing; that warning follows the weights (saw_all_unlabelled)."""
    return set() if saw_all_unlabelled(meta) else set(meta.get("trained_on", []))


def saw_all_unlabelled(meta: dict) -> bool:
    """Whether these weights, or a start they came from, pretrained with --split all."""
    return meta.get("pretrain_split") == "all"


def without_image_list(meta: dict) -> dict:
    """A sidecar for other files to quote: all but `trained_on` (long; it stays in model.json)."""
    return {k: v for k, v in meta.items() if k != "trained_on"}


def load_classifier(path: str | os.PathLike, device="cpu",
                    channels_last: bool = False) -> tuple[Classifier, dict]:
    """A fine-tuned model (model.safetensors or its run directory) in eval mode, and its sidecar."""
    from safetensors.torch import load_file

    f = weights_file(path, "model.safetensors",
                     give="the run directory of `sstl finetune` or its model.safetensors")
    meta = sidecar(f)
    if meta.get("kind") != "sstl-classifier":
        raise SystemExit(f"{f} is not a fine-tuned classifier (kind {meta.get('kind')!r}); "
                         "give the run directory of `sstl finetune`")
    missing = [k for k in ("arch", "class_names", "image_size") if k not in meta]
    if missing:
        raise SystemExit(f"{f.with_suffix('.json')} lacks {', '.join(missing)}: copy the "
                         "sidecar again with its weights from the run")
    # A model saved before the cache size was recorded: the default (224), as evaluate took it.
    meta.setdefault("cache_size", 224)
    if meta.get("arch") not in ARCHS:
        raise SystemExit(f"{f.with_suffix('.json')}: unknown arch {meta.get('arch')!r} "
                         f"(known: {', '.join(ARCHS)})")
    model = Classifier(backbone(meta["arch"]), ARCHS[meta["arch"]], len(meta["class_names"]))
    try:
        state = load_file(str(f))
    except Exception as e:  # safetensors' own error type: cut short, or not safetensors at all
        raise SystemExit(f"{f}: not a readable weights file ({first_line(e)}); a damaged or "
                         "incomplete copy? copy it again with its .json from the run") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # shapes or names differ: the pair was mixed up or edited
        first = str(e).strip().splitlines()[-1].strip()
        raise SystemExit(f"{f} does not match its sidecar {f.with_suffix('.json').name} "
                         f"({meta['arch']}, {len(meta['class_names'])} classes): {first}; "
                         "copy the weights and their .json together from one run") from None
    model = model.to(device).eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model, meta
