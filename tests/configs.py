"""Small configs for tests: keyword arguments routed to the right block of each config."""
from __future__ import annotations

import dataclasses

from sstl.engine.config import (AugmentConfig, DataConfig, FinetuneAugment, FinetuneConfig,
                                PretrainConfig, Runtime)

RUNTIME = {f.name for f in dataclasses.fields(Runtime)}
DATA = {f.name for f in dataclasses.fields(DataConfig)}
# Heads small enough for a CPU test; each method takes the fields it has.
SMALL_HEADS = {"cross": dict(proj_hidden=64, proj_dim=32, pred_hidden=64),
               "byol": dict(proj_hidden=64, proj_dim=32, pred_hidden=64),
               "simsiam": dict(proj_dim=64, pred_hidden=16),
               "simclr": dict(proj_hidden=64, proj_dim=32),
               "pirl-jigsaw": dict(proj_dim=32, tile_dim=16, negatives=64),
               "pirl-rotation": dict(proj_dim=32, negatives=64)}


def _split(kw: dict) -> tuple[dict, dict, dict]:
    rt = {"device": "cpu", "compile": False, "log_every": 100,
          **{k: kw.pop(k) for k in list(kw) if k in RUNTIME}}
    data = {k: kw.pop(k) for k in list(kw) if k in DATA}
    if data.get("path") is not None:
        data["path"] = str(data["path"])
    return rt, data, kw


def pretrain_cfg(method: str = "cross", view_size: int = 32, **kw) -> PretrainConfig:
    rt, data, kw = _split(dict(kw))
    settings = {**SMALL_HEADS[method], **kw.pop("settings", {})}
    args = {"arch": "resnet18", "init": "random", "epochs": 1, "batch_size": 32, **kw}
    return PretrainConfig(data=DataConfig(**{"cache_size": 64, **data}), runtime=Runtime(**rt),
                          method=method, settings=settings, augment=AugmentConfig(size=view_size),
                          **args)


def finetune_cfg(image_size: int = 64, **kw) -> FinetuneConfig:
    rt, data, kw = _split(dict(kw))
    args = {"arch": "resnet18", "init": "random", "epochs": 1, "batch_size": 32, **kw}
    return FinetuneConfig(data=DataConfig(**data), runtime=Runtime(**rt),
                          augment=FinetuneAugment(size=image_size), **args)
