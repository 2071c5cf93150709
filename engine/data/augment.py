"""What the views look like: one set of augmentation settings that both data paths read.

The torch path (views.py) and the DALI path (dali.py) take only these dataclasses, so the two
draw the same distribution of views; nothing here imports the rest of the engine.
"""
from __future__ import annotations

from dataclasses import dataclass

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
    view1: ViewAugment = ViewAugment(blur_p=1.0)  # BYOL's first view: always blurred
    view2: ViewAugment = ViewAugment(blur_p=0.1)  # BYOL's second view: rarely blurred

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
    # The training view (evaluation is a plain resize to `size`).
    train: ViewAugment = ViewAugment(crop_scale=(0.6, 1.0), flip_p=0.5, blur_p=0.0, jitter_p=0.5,
                                     brightness=0.2, contrast=0.2)
