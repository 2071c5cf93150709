"""A tiny fine-tuned run directory (random resnet18), saved as engine/finetune.save_model does."""
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sstl.engine.config import IMAGENET_MEAN, IMAGENET_STD
from sstl.engine.models import ARCHS, Classifier, backbone
from sstl.engine.record import save_weights

CLASSES = ["COVID", "Normal"]


def make_run(run: Path, image_size: int = 32, cache_size: int = 48, seed: int = 0,
             class_names: list[str] = CLASSES) -> Path:
    """run/model.safetensors + run/model.json for a randomly initialised resnet18 classifier."""
    torch.manual_seed(seed)
    model = Classifier(backbone("resnet18"), ARCHS["resnet18"], len(class_names)).eval()
    run.mkdir(parents=True, exist_ok=True)
    save_weights(model.state_dict(), run / "model.safetensors", {
        "kind": "sstl-classifier", "arch": "resnet18", "class_names": list(class_names),
        "positive_class": "COVID", "image_size": image_size, "cache_size": cache_size,
        "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
        "input": "grayscale replicated to 3 channels, resized square, ImageNet-normalised",
        "epoch": 0, "start": "random", "fraction": 1.0, "split_seed": 0, "test_fraction": 0.2,
        "synthetic_data": True})
    return run


def write_pngs(folder: Path, n: int = 3, side: int = 64, seed: int = 0) -> list[Path]:
    """n random grey PNGs with some structure (a bright disc), side x side pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    out = []
    for i in range(n):
        cy, cx = rng.integers(side // 4, 3 * side // 4, size=2)
        img = rng.integers(0, 80, size=(side, side)) + 150 * ((yy - cy) ** 2 + (xx - cx) ** 2 < 80)
        out.append(folder / f"img{i}.png")
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(out[-1])
    return out
