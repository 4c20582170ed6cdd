"""``vit export``: a checkpoint to ONNX (fp32 or int8) and/or a torch.export program, checked against PyTorch."""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import torch

from ..checkpoints import CheckpointError
from ..deploy.export import _example, check_onnx, compare_onnx, export_program
from ..deploy.predict import load_model, preprocess
from ..deploy.runners import export_onnx, quantize_onnx
from ..models.vision import VisionTransformer
from ._common import CommandParser, one_line


def _parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="vit export", description="Export a model to ONNX / torch.export.")
    parser.add_argument("checkpoint", help="our .ckpt, a save_pretrained directory, or any source vit.load_pretrained reads")
    parser.add_argument("--onnx", help="ONNX file to write (dynamic batch)")
    parser.add_argument("--pt2", help="torch.export program to write (.pt2, dynamic batch)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max ONNX Runtime vs PyTorch difference")
    parser.add_argument("--quantize", choices=["none", "int8"], default="none",
                        help="int8: write onnxruntime's dynamic int8 quantisation of the ONNX model")
    parser.add_argument("--check-images", nargs="+", default=None, metavar="IMAGE",
                        help="images for the int8 check (default: 64 seeded noise images)")
    parser.add_argument("--min-agreement", type=float, default=0.9,
                        help="least top-1 agreement of int8 with fp32 PyTorch on the check images (default 0.9)")
    return parser


def main(args: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 for a bad checkpoint or argument, 1 for a parity failure).

    Example:
        >>> main(["runs/vit/version_0/checkpoints/last.ckpt", "--onnx", "model.onnx"])  # doctest: +SKIP
        0
    """
    options = _parser().parse_args(args)
    if not options.onnx and not options.pt2:
        print("error: nothing to do: give --onnx PATH and/or --pt2 PATH", file=sys.stderr)
        return 2
    if options.quantize == "int8" and not options.onnx:
        print("error: --quantize int8 quantises the ONNX model: give --onnx PATH", file=sys.stderr)
        return 2
    try:
        model = load_model(options.checkpoint)
        images = preprocess(model, options.check_images) if options.check_images else None
    except (CheckpointError, ValueError, OSError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    if options.onnx and options.quantize == "int8":
        code = _export_int8(model, Path(options.onnx), options, images)
        if code:
            return code
    elif options.onnx:
        path = export_onnx(model, options.onnx, options.opset)
        diff = check_onnx(model, path)
        if diff is None:
            print(f"wrote {path} (onnx checker passed; onnxruntime not installed, parity not checked)")
        elif diff > options.tolerance:
            print(f"error: {path}: ONNX Runtime differs from PyTorch by {diff:.2e} > {options.tolerance}",
                  file=sys.stderr)
            return 1
        else:
            print(f"wrote {path} (onnxruntime max |diff| vs PyTorch {diff:.2e})")
    if options.pt2:
        print(f"wrote {export_program(model, options.pt2)}")
    return 0


def _export_int8(model: VisionTransformer, path: Path, options: argparse.Namespace,
                 images: torch.Tensor | None) -> int:
    """fp32 ONNX (checked as without --quantize) into a temporary file, quantised into ``path``, then int8 checked
    against fp32 PyTorch; returns the exit code."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        print("error: --quantize int8 needs onnxruntime (pip install onnxruntime)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(dir=path.parent if path.parent.is_dir() else None) as tmp:
        fp32 = export_onnx(model, Path(tmp) / "fp32.onnx", options.opset)
        diff = check_onnx(model, fp32)
        if diff > options.tolerance:
            print(f"error: {path}: the fp32 ONNX model differs from PyTorch by {diff:.2e} > {options.tolerance}",
                  file=sys.stderr)
            return 1
        quantize_onnx(fp32, path)
    checked = images if images is not None else _example(model, 64)
    diff, agreement = compare_onnx(model, path, checked)
    what = f"{len(checked)} {'images' if images is not None else 'noise images'}"
    if agreement < options.min_agreement:
        print(f"error: {path}: int8 top-1 agrees with fp32 PyTorch on {agreement:.1%} of {what} "
              f"< {options.min_agreement:.1%} (max |logit diff| {diff:.3g})", file=sys.stderr)
        return 1
    print(f"wrote {path} (int8; top-1 agreement with fp32 PyTorch {agreement:.1%} on {what}, "
          f"max |logit diff| {diff:.3g})")
    return 0
