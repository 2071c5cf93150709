"""The methods of Table 2, one file each, and the one table that names them."""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

from .base import Method
from .byol import BYOL, BYOLConfig
from .cross import Cross, CrossConfig
from .pirl import PIRLConfig, PIRLJigsaw, PIRLRotation
from .simclr import SimCLR, SimCLRConfig
from .simsiam import SimSiam, SimSiamConfig


class Entry(NamedTuple):
    cls: type  # the Method
    config: type  # its frozen settings dataclass
    paper: str  # where its settings come from


METHODS: dict[str, Entry] = {
    "cross": Entry(Cross, CrossConfig, "Li et al. (this paper)"),
    "byol": Entry(BYOL, BYOLConfig, "Grill et al., NeurIPS 2020"),
    "simsiam": Entry(SimSiam, SimSiamConfig, "Chen & He, CVPR 2021"),
    "simclr": Entry(SimCLR, SimCLRConfig, "Chen et al., ICML 2020"),
    "pirl-jigsaw": Entry(PIRLJigsaw, PIRLConfig, "Misra & van der Maaten, CVPR 2020"),
    "pirl-rotation": Entry(PIRLRotation, PIRLConfig, "Misra & van der Maaten, CVPR 2020"),
}


class SettingError(ValueError):
    """A method setting that does not exist or does not parse (the config turns it into a message)."""


def method_settings(name: str, overrides: dict | None = None):
    """The method's settings dataclass with `overrides` ({field: value or string}) applied."""
    if name not in METHODS:
        raise SettingError(f"--method must be one of {', '.join(METHODS)}, not {name!r}")
    cls = METHODS[name].config
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in (overrides or {}).items():
        if key not in fields:
            raise SettingError(f"{name} has no setting {key!r}; its settings are "
                               f"{', '.join(fields)}")
        default = getattr(cls(), key)
        try:
            values[key] = type(default)(value) if isinstance(value, str) else value
        except ValueError:
            raise SettingError(f"{name} setting {key}={value!r} is not a "
                               f"{type(default).__name__}") from None
    return cls(**values)


def build(name: str, backbone, feat_dim: int, settings) -> Method:
    return METHODS[name].cls(backbone, feat_dim, settings)


__all__ = ["METHODS", "Method", "method_settings", "build", "SettingError", "Cross", "BYOL",
           "SimSiam", "SimCLR", "PIRLJigsaw", "PIRLRotation", "CrossConfig", "BYOLConfig",
           "SimSiamConfig", "SimCLRConfig", "PIRLConfig"]
