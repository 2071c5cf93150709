"""`sstl export`: a fine-tuned model as ONNX, its preprocessing in a JSON sidecar, checked."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sstl.cli.paths import path_value
from sstl.engine.config import ExportConfig
from sstl.engine.runs import Output


def export(
    model: Path = typer.Option(..., "--model", help="Run directory of `sstl finetune` "
                               "(or its model.safetensors)", parser=path_value),
    format: str = typer.Option(ExportConfig.format, "--format", help="onnx (the only format so far)"),
    out: Optional[Path] = typer.Option(None, "--out", help="Output file \\[default: model.onnx "
                                       "in the run directory]", parser=path_value),
    images: Optional[list[Path]] = typer.Option(None, "--images", help="Images or folders to "
                                                "check the export on \\[default: a few of the "
                                                "run's training data, else synthetic ones]",
                                                parser=path_value),
    tolerance: float = typer.Option(ExportConfig.tolerance, help="Largest accepted |onnx - torch| probability"),
):
    """Export the classifier (opset 17, any batch size) and check it against torch."""
    from sstl.engine.export import export as run

    r = run(ExportConfig(model=str(model), format=format, out=str(out) if out else None,
                         images=tuple(str(p) for p in images or ()), tolerance=tolerance))
    Output().print(f"wrote {r['onnx']} (opset {r['opset']}) and {r['sidecar']}\n"
                    f"checked on {r['images_checked']} {r['check_source']}{not_checked(r)}: "
                    "onnxruntime vs torch "
                    f"max |diff| of probabilities {r['max_abs_diff_probs']:.2e} "
                    f"(tolerance {r['tolerance']:g}), same predicted class: "
                    f"{'yes' if r['same_argmax'] else 'NO'}", markup=False,
                    soft_wrap=True)  # paths unbroken, for the reader's copy and paste


def not_checked(r: dict) -> str:
    """"; 2 could not be read (first: a.png: why); 1 left out", or "" when every file was
    read: a check on fewer images than given must say so."""
    said = ""
    if r["images_unreadable"]:
        said += f"; {r['images_unreadable']} could not be read (first: {r['first_unreadable']})"
    if r["images_left_out"]:
        said += f"; {r['images_left_out']} left out (hidden files, masks/; name one to check it)"
    return said
