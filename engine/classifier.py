"""The classifier's step, shared by fine-tuning and stage 1 (`sstl supervised`), and its
predictions: backbone + linear head, cross-entropy, SGD on every weight, the learning rate a
function of the global step."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from . import accel, dist
from .config import Resolved
from .loop import Trainer, sgd
from .models import ARCHS, Classifier, backbone, imagenet_state_dict


def supervised_forward(model, label_smoothing: float):
    """The classifier's step up to the loss: cross-entropy of one labelled batch."""
    def forward(x: torch.Tensor, y: torch.Tensor):
        return F.cross_entropy(model(x), y, label_smoothing=label_smoothing), {}
    return forward


def lr_at(lr: float, schedule: str, step: int, total: int) -> float:
    """The learning rate of a global step: a function of the step alone (nothing to resume)."""
    if schedule == "constant":
        return lr
    return 0.5 * lr * (1 + math.cos(math.pi * step / total))


def classifier_trainer(arch: str, init: str, imagenet_weights: str, n_classes: int,
                       res: Resolved, *, lr: float, schedule: str, momentum: float,
                       weight_decay: float, label_smoothing: float, seed: int, total_steps: int,
                       flag: str = "--init") -> Trainer:
    """Backbone (from `init`) + linear head, SGD on every weight, the schedule per step."""
    torch.manual_seed(seed)  # the head's initialisation (and a random backbone's)
    net = backbone(arch, init, imagenet_weights, flag=flag)
    model = Classifier(net, ARCHS[arch], n_classes).to(res.device)
    if res.world_size > 1:  # BN statistics of the global batch (torchrun)
        dist.sync_batchnorm_(model, res.device.startswith("cuda"))
    if res.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = sgd(model.parameters(), lr, momentum, weight_decay, res.device)
    ddp = dist.data_parallel(model, res)  # gradients averaged over ranks (torchrun)
    compiled = accel.compile_module(ddp) if res.compile else ddp
    return Trainer(model=model, forward=supervised_forward(compiled, label_smoothing), opt=opt,
                   autocast=res.autocast,
                   lr_at=lambda step: lr_at(lr, schedule, step, total_steps),
                   graphs=res.graphs, compiled=res.compile, dtype=res.dtype)


@torch.no_grad()
def class_probs(forward, batches, autocast) -> torch.Tensor:
    """Softmax probabilities (fp32, on the device) of a stream of model inputs, in order."""
    return torch.cat([_softmax(forward, x, autocast) for x in batches])


def _softmax(forward, x, autocast) -> torch.Tensor:
    with autocast():
        return forward(x).float().softmax(1)


def eval_probs(t: Trainer, test) -> np.ndarray:
    """Class probabilities of a test source under the current weights (eval mode)."""
    t.model.eval()
    probs = class_probs(t.model, (x for x, _ in test.epoch(0)), t.autocast)
    t.model.train()
    return probs.cpu().numpy()  # the epoch's one transfer to the host


def check_start(arch: str, init: str, imagenet_weights: str, flag: str = "--init") -> None:
    """Fail on missing or unfitting starting weights before a long first scan of the data, as
    pretrain does by building its model first (the weights are loaded again when built)."""
    if init == "imagenet":
        imagenet_state_dict(arch, imagenet_weights, flag)
    elif init != "random":
        backbone(arch, init, imagenet_weights, flag)
