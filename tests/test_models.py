"""Backbone initialisation: the real ImageNet path (offline), local files, clear failures."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from sstl.engine.models import backbone

from .configs import finetune_cfg, pretrain_cfg


def _random_sd(arch="resnet18"):
    torch.manual_seed(3)
    return getattr(torchvision.models, arch)().state_dict()


def test_imagenet_loads_from_torch_hub_cache(tmp_path, monkeypatch):
    """The real path: torchvision's weights file in $TORCH_HOME, found without a download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    w = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    sd = _random_sd()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(sd, tmp_path / "hub" / "checkpoints" / os.path.basename(w.url))
    net = backbone("resnet18", "imagenet", "V1")
    torch.testing.assert_close(net.state_dict()["layer1.0.conv1.weight"], sd["layer1.0.conv1.weight"])
    assert isinstance(net.fc, torch.nn.Identity)


def test_imagenet_offline_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)  # the network call
    with pytest.raises(SystemExit) as e:
        backbone("resnet50", "imagenet", "V2")
    msg = str(e.value)
    assert "resnet50-11ad3fa6.pth" in msg and str(tmp_path / "hub" / "checkpoints") in msg
    assert "--init random" in msg
    # reproduce's transfer start: its own flag, which has no `random` (a row picks that).
    from sstl.engine.classifier import check_start

    with pytest.raises(SystemExit) as e:
        check_start("resnet50", "imagenet", "V2", flag="--transfer")
    msg = str(e.value)
    assert msg.startswith("--transfer imagenet needs") and "--transfer PATH" in msg
    assert "--init" not in msg
    with pytest.raises(SystemExit, match="has no IMAGENET1K_V9"):
        backbone("resnet50", "imagenet", "V9")
    with pytest.raises(SystemExit, match="resnet18 has no IMAGENET1K_V2.*--imagenet-weights V1"):
        backbone("resnet18", "imagenet", "V2")


def test_imagenet_weights_auto_is_the_newest_an_arch_has_and_v2_is_refused_for_resnet18():
    """--imagenet-weights auto (the default) is V1 for resnet18 (it has no V2) and V2 for
    resnet50; V2 typed for resnet18 is one line naming the flag, from check(). A start that is
    not torchvision's (random, --encoder) keeps V2, the value earlier versions keyed."""
    from sstl.engine.config import ConfigError, SupervisedConfig, check
    from sstl.engine.keys import resume_key

    for cfg in (finetune_cfg(init="imagenet", imagenet_weights="V2"),
                pretrain_cfg(init="imagenet", imagenet_weights="V2"),
                SupervisedConfig(arch="resnet18", init="imagenet", imagenet_weights="V2")):
        with pytest.raises(ConfigError, match="resnet18 has only V1 .*--imagenet-weights V1"):
            check(cfg)
    for cfg in (finetune_cfg(init="imagenet"), pretrain_cfg(init="imagenet"),
                SupervisedConfig(arch="resnet18", init="imagenet")):
        assert cfg.imagenet_weights == "auto" and check(cfg).imagenet_weights == "V1"
    assert check(pretrain_cfg(init="imagenet", arch="resnet50")).imagenet_weights == "V2"
    assert check(pretrain_cfg(init="imagenet", arch="resnet50",
                              imagenet_weights="V1")).imagenet_weights == "V1"
    for cfg in (finetune_cfg(init="random"), finetune_cfg(init="imagenet", encoder="runs/pre"),
                pretrain_cfg(init="random")):
        checked = check(cfg)
        assert checked.imagenet_weights == "V2"
        # The key a run of the earlier default (V2, typed or not) was saved under.
        assert resume_key(checked) == resume_key(check(
            dataclasses.replace(cfg, imagenet_weights="V2")))
    with pytest.raises(ConfigError, match="V1, V2 or auto"):
        check(finetune_cfg(imagenet_weights="V3"))


def test_the_default_configs_keep_the_resume_keys_of_the_version_before_auto():
    """The keys runs of f035189 (before --imagenet-weights auto) were saved under, computed
    there: with auto as the default each command still finds and resumes those runs."""
    from sstl.engine.config import FinetuneConfig, PretrainConfig, SupervisedConfig, check
    from sstl.engine.keys import resume_key

    keys = {PretrainConfig(): "54701a6e7377d73a",
            PretrainConfig(arch="resnet18", init="random"): "cf3f3e9c0216b2f9",
            # resnet18 from ImageNet needed --imagenet-weights V1 typed then
            FinetuneConfig(arch="resnet18", init="imagenet"): "d829ae823592f9b7",
            FinetuneConfig(): "42164d5a24f65b37", SupervisedConfig(): "0bce0c215ea196ce"}
    assert [resume_key(check(c)) for c in keys] == list(keys.values())


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {_MARK}",))


_MARK = "/tmp/sstl-test-imagenet-pickle-ran"


def test_the_imagenet_file_is_read_as_plain_data_and_checked(tmp_path, monkeypatch):
    """The place the offline message tells users to fill is read with weights_only=True (a
    crafted file runs no code), and a file of other weights there is one line naming it."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    f = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    f.parent.mkdir(parents=True)
    if os.path.exists(_MARK):
        os.remove(_MARK)
    torch.save({"conv1.weight": _Exploit()}, f)
    with pytest.raises(SystemExit, match="resnet18-f37072fd.pth"):
        backbone("resnet18", "imagenet", "V1")
    assert not os.path.exists(_MARK)
    torch.save(_random_sd("resnet50"), f)  # the right name, another network's weights
    with pytest.raises(SystemExit, match="resnet18-f37072fd.pth does not hold torchvision's "
                                         "resnet18 weights"):
        backbone("resnet18", "imagenet", "V1")


def test_local_state_dict_with_prefixes_and_head(tmp_path):
    sd = _random_sd()
    wrapped = {f"module._orig_mod.{k}": v for k, v in sd.items()}  # DDP + compile prefixes
    torch.save({"state_dict": wrapped}, tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in sd.items() if not k.startswith("fc.")},
              str(tmp_path / "w.safetensors"))
    for f in ("w.pth", "w.safetensors"):
        net = backbone("resnet18", str(tmp_path / f))
        torch.testing.assert_close(net.state_dict()["conv1.weight"], sd["conv1.weight"])


def test_local_state_dict_failures(tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        backbone("resnet18", str(tmp_path / "missing.pth"))
    torch.save(_random_sd("resnet50"), tmp_path / "r50.pth")
    with pytest.raises(SystemExit, match="does not fit"):
        backbone("resnet18", str(tmp_path / "r50.pth"))
    with pytest.raises(SystemExit, match="--arch must be one of"):
        backbone("vgg11")


def test_finetune_refuses_missing_weights_before_scanning_the_data(tmp_path, monkeypatch):
    """A missing ImageNet file or --encoder fails at once, not after a long first scan."""
    import sstl.engine.command as command_mod
    from sstl.engine.finetune import finetune

    from .configs import finetune_cfg

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("network unreachable")))
    monkeypatch.setattr(command_mod, "load_dataset",
                        lambda *a, **k: pytest.fail("the data was scanned first"))
    with pytest.raises(SystemExit, match="resnet18-f37072fd.pth"):
        finetune(finetune_cfg(init="imagenet", imagenet_weights="V1", out=str(tmp_path)))
    with pytest.raises(SystemExit, match="--encoder .*nowhere: no such file or folder$"):
        finetune(finetune_cfg(encoder=str(tmp_path / "nowhere"), out=str(tmp_path)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no encoder.safetensors there"):
        finetune(finetune_cfg(encoder=str(tmp_path / "empty"), out=str(tmp_path)))


def test_the_sidecars_and_card_name_the_imagenet_weights(tmp_path, monkeypatch):
    """"imagenet" alone does not say V1 or V2: model.json and the model card do."""
    import json

    from sstl.engine.finetune import finetune

    from .configs import finetune_cfg

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    f = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    f.parent.mkdir(parents=True)
    torch.save(_random_sd(), f)
    run = finetune(finetune_cfg(init="imagenet", imagenet_weights="V1", out=str(tmp_path),
                                name="ft", image_size=32, cache_size=64))
    assert json.loads((run / "model.json").read_text())["imagenet_weights"] == "IMAGENET1K_V1"
    assert "imagenet (IMAGENET1K_V1)" in (run / "MODEL_CARD.md").read_text()


def test_a_start_file_that_is_not_weights_says_what_it_is(tmp_path):
    """An image or a text file given as weights, and a pickle holding more than tensors: each
    a line the user can act on, never torch's advice to load with weights_only=False."""
    import pickle

    (tmp_path / "notes.txt").write_text("hello\n")
    (tmp_path / "xray.pth").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    for f in ("notes.txt", "xray.pth"):
        with pytest.raises(SystemExit, match="not a readable state dict: the file is neither "
                                             "torch.save's format"):
            backbone("resnet18", str(tmp_path / f))
    save_file({"conv1.weight": torch.zeros(1)}, tmp_path / "w.bin")  # safetensors, misnamed
    with pytest.raises(SystemExit, match="w.bin: not a readable state dict: it looks like a "
                                         "safetensors file: name it .safetensors"):
        backbone("resnet18", str(tmp_path / "w.bin"))
    (tmp_path / "cfg.pth").write_text('{"net": {"w": 1}}' + " " * 64)  # JSON, byte 9 a "{"
    with pytest.raises(SystemExit, match="neither torch.save's format"):
        backbone("resnet18", str(tmp_path / "cfg.pth"))
    torch.save({"conv1.weight": torch.zeros(1), "opt": _Object()}, tmp_path / "obj.pth")
    with open(tmp_path / "pickled.pt", "wb") as fh:  # the older, non-zip torch.save format
        pickle.dump({"w": _Object()}, fh, protocol=2)
    for f in ("obj.pth", "pickled.pt"):
        with pytest.raises(SystemExit) as e:
            backbone("resnet18", str(tmp_path / f))
        assert "Python objects beyond tensors" in str(e.value)
        assert "weights_only" not in str(e.value)


class _Object:
    pass
