"""Grad-CAM: where in the image the classifier's evidence for a class lies.

Grad-CAM (Selvaraju et al.) weights each channel of the backbone's last stage (ResNet
`layer4`, 1/32 of the input side) by the mean gradient of the class logit, keeps the
positive part and upsamples it: a coarse map, 7 x 7 cells at 224 pixels. It shows what
the model uses, right or wrong (text markers, borders, devices), not where disease is.
Computed with pytorch-grad-cam (the `clinical` extra), always in fp32 without autocast.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from .data.views import eval_view

OVERLAY_ALPHA = 0.4  # share of the heat map in the overlay; the radiograph stays readable


def target_layer(model: nn.Module) -> nn.Module:
    """The backbone's last convolutional stage: Classifier.encoder.layer4 (or model.layer4)."""
    net = getattr(model, "encoder", model)
    if not hasattr(net, "layer4"):
        raise SystemExit(f"Grad-CAM needs a ResNet-like backbone with a `layer4`; "
                         f"{type(net).__name__} has none")
    return net.layer4


def grad_cam_classes():
    """pytorch-grad-cam's GradCAM and ClassifierOutputTarget, or one line saying how to get it
    (predict asks before its first image, so a missing package costs no predictions)."""
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        raise SystemExit("Grad-CAM needs pytorch-grad-cam: pip install 'sstl[clinical]' "
                         "(or pip install grad-cam)") from None
    return GradCAM, ClassifierOutputTarget


def cam_maps(model: nn.Module, images_uint8: np.ndarray, size: int,
             target_class_idx: int | Sequence[int] | None = None,
             device="cpu") -> tuple[np.ndarray, np.ndarray]:
    """(maps, classes): Grad-CAM maps in [0, 1] of shape (N, H, W), the images' own size, and
    the class each explains. target_class_idx: one class for all, one per image, or None for
    each image's predicted class. images_uint8: (N, H, W) grey uint8, as decode_square gives.
    """
    GradCAM, ClassifierOutputTarget = grad_cam_classes()
    images = np.asarray(images_uint8)
    x = eval_view(torch.from_numpy(images).to(device), size)  # the input predict() gives it
    model = model.float().eval()
    if target_class_idx is None:
        with torch.no_grad():
            classes = model(x).argmax(1).tolist()
    elif isinstance(target_class_idx, int):
        classes = [target_class_idx] * len(images)
    else:
        classes = [int(k) for k in target_class_idx]
    with GradCAM(model=model, target_layers=[target_layer(model)]) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(k) for k in classes])
    h, w = images.shape[1:]
    if maps.shape[1:] != (h, w):  # the model's input side -> the image's side
        maps = np.stack([np.asarray(Image.fromarray(m).resize((w, h), Image.BILINEAR))
                         for m in maps.astype(np.float32)])
    return np.clip(maps, 0, 1), np.array(classes)


def overlay(gray: np.ndarray, cam: np.ndarray) -> Image.Image:
    """The radiograph in grey under the map in the `jet` colours (red = most evidence)."""
    from matplotlib import colormaps

    heat = colormaps["jet"](cam)[..., :3]
    base = np.repeat(gray[..., None] / 255.0, 3, axis=2)
    rgb = (1 - OVERLAY_ALPHA) * base + OVERLAY_ALPHA * heat
    return Image.fromarray(np.rint(rgb * 255).astype(np.uint8), "RGB")


def gradcam_overlays(model: nn.Module, images_uint8: np.ndarray, size: int,
                     target_class_idx: int | Sequence[int] | None, out_dir, names: Sequence[str],
                     device="cpu") -> list[Path]:
    """One overlay PNG per image, out_dir/<name>.png; returns their paths in order."""
    if len(names) != len(images_uint8):
        raise ValueError(f"{len(names)} names for {len(images_uint8)} images")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    maps, _ = cam_maps(model, images_uint8, size, target_class_idx, device)
    paths = []
    for gray, cam, name in zip(images_uint8, maps, names):
        p = out / f"{name}.png"
        overlay(np.asarray(gray), cam).save(p)
        paths.append(p)
    return paths
