"""Export a fine-tuned classifier to ONNX, with its preprocessing written down, and check it.

The graph takes the normalised input tensor (float32, N x 3 x S x S, any N) and returns
`logits` and `probs` (softmax). Decoding and resizing stay outside the graph, as in every
deployment: the JSON sidecar beside it (model.onnx.json) says exactly what to do, step by step,
matching engine/predict.py (decode_square) and engine/data/views.py (eval_view). The .onnx
file itself carries the essentials in its metadata_props (onnx_metadata), so a copy without
its sidecar still says its classes, input and origin. The export is then run with
onnxruntime on real images and compared with torch on the same tensors.
"""
from __future__ import annotations

import json
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .config import IMAGENET_MEAN, IMAGENET_STD, ExportConfig, check
from .data.cache import file_digest
from .data.index import decode_square, find_records
from .data.views import eval_view
from .io import atomic_write, make_dir
from .keys import recorded_at
from .models import load_classifier, weights_file, without_image_list
from .record import git_sha

OPSET = 17
TOLERANCE = ExportConfig.tolerance  # largest |onnx - torch| probability accepted
CHECK_IMAGES = 8  # synthetic images the check runs when no real ones are found
MOST_IMAGES = 64  # real images the check runs at most (decoding stops there)
# metadata_props' `kind` in every export: what says a file may be replaced (refuse_other_files)
ONNX_KIND = "sstl-onnx-classifier"


class WithProbs(nn.Module):
    """The classifier with its softmax: deployments want probabilities, audits want logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        logits = self.model(x)
        return logits, logits.softmax(1)


def require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError as e:
        raise SystemExit(f"export needs onnx and onnxruntime ({e.name} is missing): "
                         "pip install 'sstl[clinical]' (or pip install onnx onnxruntime)") from None
    return onnxruntime


def preprocessing(meta: dict) -> dict:
    """What a deployment must do to an image file before the graph: predict()'s path, in words."""
    s, c = int(meta["image_size"]), int(meta["cache_size"])
    return {
        "input_name": "input", "input_shape": ["batch", 3, s, s], "input_dtype": "float32",
        "outputs": {"logits": ["batch", len(meta["class_names"])],
                    "probs": "softmax of logits over the classes, in class_names order"},
        "class_names": meta["class_names"], "positive_class": meta["positive_class"],
        "image_size": s, "cache_size": c, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
        "steps": [
            "apply the file's EXIF orientation, if any (PIL ImageOps.exif_transpose)",
            "decode to grey uint8 (H, W): 8-bit files keep their values (RGB -> ITU-R 601 luma); "
            "16-bit and float files are stretched from their own min..max to 0..255; DICOM: "
            "modality LUT (rescale slope/intercept), then the VOI LUT or window centre/width "
            "(else: data of 8 bits or fewer that no rescale changed kept as it is, deeper data "
            "min..max) to 0..255, MONOCHROME1 inverted; an image of one value is refused",
            f"resize the whole image to {c} x {c} (PIL bilinear on the uint8 image, rounded to "
            "uint8; the aspect ratio is not kept)",
            f"resize to {s} x {s} (bilinear, antialiased, align_corners=False, as "
            "torch.nn.functional.interpolate)" if s != c else f"(already {s} x {s})",
            "x = grey / 255 as float32, clamped to [0, 1]",
            "replicate to 3 channels and normalise each: (x - mean[c]) / std[c] (ImageNet)",
            "stack images along the batch axis: N x 3 x S x S, NCHW",
        ],
        "reference": "sstl engine/predict.py predict(), engine/data/views.py eval_view()",
    }


def onnx_metadata(meta: dict, weights: Path) -> dict[str, str]:
    """What the .onnx itself says (metadata_props, strings only; lists as JSON): the classes,
    the input, the whole preprocessing, and which weights and sstl made it."""
    optional = {k: str(meta[k]) for k in ("settings_hash", "data_fingerprint") if meta.get(k)}
    return {"kind": ONNX_KIND, "class_names": json.dumps(meta["class_names"]),
            "positive_class": str(meta["positive_class"]), "image_size": str(meta["image_size"]),
            "cache_size": str(meta["cache_size"]), "mean": json.dumps(list(IMAGENET_MEAN)),
            "std": json.dumps(list(IMAGENET_STD)),
            "preprocessing": json.dumps(preprocessing(meta)),
            "source_run": weights.parent.name, "source_weights_blake2b": file_digest(weights),
            **optional, "sstl_version": _sstl_version(), "sstl_git_sha": git_sha()}


def _sstl_version() -> str:
    try:
        return metadata.version("sstl")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def export(cfg: ExportConfig) -> dict:
    """`sstl export`: the checked config's export (export_onnx), and its report."""
    cfg = check(cfg)
    return export_onnx(cfg.model, cfg.out, cfg.images, cfg.tolerance)


def export_onnx(model_path, out=None, images=(), tolerance: float = TOLERANCE) -> dict:
    """Write the ONNX graph and its sidecar; verify on `images` (or real ones); return a report.

    out: the .onnx file [default: model.onnx beside model.safetensors]; check(ExportConfig)
    has refused any other name. images: files or folders to verify on; without them, the
    run's own training data when it is still there, else synthetic radiograph-like images.
    SystemExit when the outputs differ by > tolerance, and before the check when `out` or its
    sidecar is a file that no earlier export wrote (refuse_other_files).
    """
    ort = require_onnx()
    model, meta = load_classifier(model_path, "cpu")
    weights = weights_file(model_path, "model.safetensors")
    out = Path(out) if out else weights.with_name("model.onnx")
    sidecar = out.with_name(out.name + ".json")  # model.onnx.json: model.json is the weights'!
    refuse_other_files(out, sidecar)
    make_dir(out.parent)
    s = int(meta["image_size"])
    wrapped = WithProbs(model).eval()
    grey, source, unread = check_images(model_path, meta, images)  # before writing anything
    x = eval_view(torch.from_numpy(grey), s)
    with torch.no_grad():
        want = wrapped(x)[1].numpy()
    props = onnx_metadata(meta, weights)
    report = {}

    def write_verified(tmp: Path) -> None:
        """The graph at `tmp`, checked by onnxruntime against torch, and then its sidecar: a
        failed export never leaves a file, nor replaces a verified model.onnx."""
        with warnings.catch_warnings():  # the TorchScript exporter: no onnxscript dependency
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(wrapped, torch.zeros(2, 3, s, s), str(tmp), opset_version=OPSET,
                              input_names=["input"], output_names=["logits", "probs"],
                              dynamic_axes={n: {0: "batch"} for n in ("input", "logits", "probs")},
                              dynamo=False)
        add_metadata(tmp, props)  # before the check: the verified file is the one kept
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = session.run(["probs"], {"input": x.numpy()})[0]
        diff = float(np.abs(got - want).max())
        report.update({"onnx": str(out), "opset": OPSET, "images_checked": len(grey),
                       "check_source": source, **unread_counts(unread),
                       "max_abs_diff_probs": diff,
                       "tolerance": tolerance,
                       "same_argmax": bool((got.argmax(1) == want.argmax(1)).all()),
                       "ok": diff <= tolerance})
        if not report["ok"]:
            raise SystemExit(f"{out}: onnxruntime's probabilities differ from torch's by "
                             f"{diff:.2e} (> {tolerance:g}) on {len(grey)} images; the export "
                             "is not faithful, nothing was written")
        text = json.dumps({"format": "onnx", "opset": OPSET,
                           "source_model": without_image_list(meta),
                           "preprocessing": preprocessing(meta), "verification": report},
                          indent=2, default=str)
        atomic_write(sidecar, lambda f: f.write_text(text))

    atomic_write(out, write_verified)  # then on disk (fsync), 0644, renamed into place
    report["sidecar"] = str(sidecar)
    return report


def add_metadata(path: Path, props: dict[str, str]) -> None:
    """The ONNX file at `path`, rewritten with `props` as its metadata_props."""
    import onnx

    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(path))


def refuse_other_files(out: Path, sidecar: Path) -> None:
    """SystemExit unless `out` and its sidecar are absent or an earlier sstl export's.

    An earlier export is an ONNX model whose metadata_props say kind sstl-onnx-classifier,
    or (exports made before sstl wrote that) one whose sidecar beside it is sstl's (it
    quotes an sstl-classifier as source_model). Anything else, another tool's model or an
    image renamed .onnx, is someone else's file and is never replaced.
    """
    ours = _sstl_sidecar(sidecar)
    if sidecar.exists() and not ours:
        raise SystemExit(f"{sidecar} exists and is not the sidecar of an earlier sstl export: "
                         f"exporting to {out} would replace it; name another .onnx file with "
                         "--out, or move that file away")
    if out.exists():
        props = _onnx_props(out)
        if props is None or not (props.get("kind") == ONNX_KIND or ours):
            raise SystemExit(f"{out} exists and is not an earlier sstl export (no sstl "
                             f"metadata in it, nor an sstl {sidecar.name} beside it): the "
                             "export would replace it; name a new .onnx file with --out, or "
                             "move that file away")


def _onnx_props(path: Path) -> dict[str, str] | None:
    """An ONNX model's metadata_props, or None where `path` is no ONNX model (an image, say)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # protobuf's DecodeError, an unreadable file: not a model of ours
        return None
    if not len(model.graph.node):  # other bytes can parse as an empty protobuf message
        return None
    return {p.key: p.value for p in model.metadata_props}


def _sstl_sidecar(path: Path) -> bool:
    """Whether `path` is the JSON sidecar an earlier export wrote."""
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):  # absent, unreadable or not JSON
        return False
    return (isinstance(found, dict) and found.get("format") == "onnx"
            and isinstance(found.get("source_model"), dict)
            and found["source_model"].get("kind") == "sstl-classifier")


def check_images(model_path, meta: dict,
                 images=()) -> tuple[np.ndarray, str, list[tuple[str, str]]]:
    """(N, C, C) uint8 at the cache size, where they came from, and (path, why) of each file
    not checked: missing or undecodable, or left out by a folder's scan (why: LEFT_OUT ...)."""
    size = int(meta["cache_size"])
    if images:
        from .predict import image_files

        files = image_files(images)
        source = "of the given images"
    else:  # the run's --data folder, test split included: a numerical check, not a score
        files = [(p, None) for p in _training_images(model_path)]
        source = "images of the run's --data"
    decoded, unread = [], []
    for k, (path, err) in enumerate(files):
        if len(decoded) == MOST_IMAGES:  # a numerical check: enough, and said
            source += f" (the first {MOST_IMAGES} readable; {len(files) - k} more not checked)"
            break
        img, why = (None, err) if err else decode_square(path, size)
        if img is None:
            unread.append((str(path), why))
        else:
            decoded.append(img)
    if images and not decoded:
        first = f" (first: {': '.join(unread[0])})" if unread else ""
        raise SystemExit(f"none of {', '.join(map(str, images))} could be decoded to check "
                         f"the export{first}; give readable images with --images")
    if not decoded:
        from .data.synthetic import CLASSES, draw

        rng = np.random.default_rng(0)
        return (np.stack([draw(CLASSES[i % len(CLASSES)], rng, size) for i in range(CHECK_IMAGES)]),
                "synthetic radiograph-like images (the run's --data was not found)", [])
    return np.stack(decoded), source, unread


def unread_counts(unread: list[tuple[str, str]]) -> dict:
    """The report's account of the files the check did not run on: how many could not be
    read, the first of them with why, and how many a folder's scan left out (hidden files,
    masks/), counted apart as predict's table counts them."""
    from .predict import LEFT_OUT

    bad = [f"{path}: {why}" for path, why in unread if not why.startswith(LEFT_OUT)]
    return {"images_unreadable": len(bad), "first_unreadable": bad[0] if bad else None,
            "images_left_out": len(unread) - len(bad)}


def _training_images(model_path) -> list[str]:
    """A spread of CHECK_IMAGES files from the data named in the run's config.json, if any."""
    run = weights_file(model_path, "model.safetensors").parent
    try:
        # recorded_at: a relative --data read from the folder the run was started in
        data = recorded_at(run)["data"]["path"]
        _, records = find_records(data)
    except (OSError, KeyError, TypeError, ValueError, SystemExit):
        return []
    step = max(1, len(records) // CHECK_IMAGES)
    return [r.path for r in records[::step][:CHECK_IMAGES]]
