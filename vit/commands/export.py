"""``vit export``: a checkpoint to ONNX (fp32 or int8), an OpenVINO IR (fp32 or int8) and/or a torch.export
program, each checked against PyTorch."""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import torch

from ..checkpoints import CheckpointError
from ..deploy.common import BackendError
from ..deploy.export import _example, check_onnx, compare_onnx, export_program
from ..deploy.onnx_backend import export_onnx_newest, quantize_onnx
from ..deploy.predict import calibration_images, load_model, preprocess
from ..models.vision import VisionTransformer
from ._common import CommandParser, one_line


def _parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="vit export", description="Export a model to ONNX / OpenVINO IR / torch.export.")
    parser.add_argument("checkpoint", help="our .ckpt, a save_pretrained directory, or any source vit.load_pretrained reads")
    parser.add_argument("--onnx", help="ONNX file to write (dynamic batch)")
    parser.add_argument("--openvino", metavar="DIR", help="folder for the OpenVINO IR (model.xml + model.bin)")
    parser.add_argument("--pt2", help="torch.export program to write (.pt2, dynamic batch)")
    parser.add_argument("--opset", type=int, default=None,
                        help="ONNX opset (default: the newest that torch's exporter and onnxruntime both handle)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max ONNX Runtime vs PyTorch difference")
    parser.add_argument("--precision", choices=["fp32", "int8"], default="fp32",
                        help="int8: onnxruntime's dynamic int8 quantisation of the ONNX model, NNCF's post-training "
                             "int8 quantisation of the OpenVINO IR (default fp32; OpenVINO picks bf16 at run time "
                             "where the CPU has it)")
    parser.add_argument("--quantize", choices=["none", "int8"], default=None,
                        help="the old spelling: --quantize int8 is --precision int8")
    parser.add_argument("--calibration", default=None, metavar="DIR",
                        help="OpenVINO int8: images to calibrate on, a folder or .txt list (default: --check-images, "
                             "else seeded noise; real images give better int8)")
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
    if options.quantize == "int8":
        options.precision = "int8"
    if not (options.onnx or options.openvino or options.pt2):
        print("error: nothing to do: give --onnx PATH, --openvino DIR and/or --pt2 PATH", file=sys.stderr)
        return 2
    if options.precision == "int8" and not (options.onnx or options.openvino):
        print("error: --precision int8 quantises the ONNX model or the OpenVINO IR: give --onnx PATH or "
              "--openvino DIR", file=sys.stderr)
        return 2
    try:
        model = load_model(options.checkpoint)
        images = preprocess(model, options.check_images) if options.check_images else None
        calibration = calibration_images(model, options.calibration) if options.calibration else images
    except (CheckpointError, ValueError, OSError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    steps = []
    if options.onnx:
        steps.append(lambda: (_export_int8 if options.precision == "int8" else _export_fp32)(
            model, Path(options.onnx), options, images))
    if options.openvino:
        steps.append(lambda: _export_openvino(model, Path(options.openvino), options, images, calibration))
    for step in steps:
        code = step()
        if code:
            return code
    if options.pt2:
        print(f"wrote {export_program(model, options.pt2)}")
    return 0


def _export_fp32(model: VisionTransformer, path: Path, options: argparse.Namespace, images) -> int:
    path, opset = export_onnx_newest(model, path, options.opset)
    diff = check_onnx(model, path)
    if diff is None:
        print(f"wrote {path} (opset {opset}; onnx checker passed; onnxruntime not installed, parity not checked)")
    elif diff > options.tolerance:
        print(f"error: {path}: ONNX Runtime differs from PyTorch by {diff:.2e} > {options.tolerance}", file=sys.stderr)
        return 1
    else:
        print(f"wrote {path} (opset {opset}; onnxruntime max |diff| vs PyTorch {diff:.2e})")
    return 0


def _export_int8(model: VisionTransformer, path: Path, options: argparse.Namespace,
                 images: torch.Tensor | None) -> int:
    """fp32 ONNX (checked as without --precision int8) into a temporary file, quantised into ``path``, then int8
    checked against fp32 PyTorch; returns the exit code."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        print("error: --precision int8 for ONNX needs onnxruntime (pip install onnxruntime)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(dir=path.parent if path.parent.is_dir() else None) as tmp:
        fp32, opset = export_onnx_newest(model, Path(tmp) / "fp32.onnx", options.opset)
        diff = check_onnx(model, fp32)
        if diff > options.tolerance:
            print(f"error: {path}: the fp32 ONNX model differs from PyTorch by {diff:.2e} > {options.tolerance}",
                  file=sys.stderr)
            return 1
        quantize_onnx(fp32, path)
    return _check_int8(model, path, options, images, lambda x: compare_onnx(model, path, x), f"opset {opset}")


def _export_openvino(model: VisionTransformer, folder: Path, options: argparse.Namespace,
                     images: torch.Tensor | None, calibration: torch.Tensor | None) -> int:
    try:
        from ..deploy.openvino_backend import compare_openvino, export_openvino
        path = export_openvino(model, folder, options.precision, calibration)
    except BackendError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    if options.precision == "int8":
        what = "calibrated on " + (f"{len(calibration)} images" if calibration is not None else "32 noise images")
        return _check_int8(model, path, options, images, lambda x: compare_openvino(model, path, x), what)
    diff, _ = compare_openvino(model, path, _example(model, 3))
    if diff > options.tolerance:
        print(f"error: {path}: OpenVINO (fp32) differs from PyTorch by {diff:.2e} > {options.tolerance}",
              file=sys.stderr)
        return 1
    print(f"wrote {path} (OpenVINO fp32 max |diff| vs PyTorch {diff:.2e})")
    return 0


def _check_int8(model, path: Path, options, images, compare, note: str) -> int:
    checked = images if images is not None else _example(model, 64)
    diff, agreement = compare(checked)
    what = f"{len(checked)} {'images' if images is not None else 'noise images'}"
    if agreement < options.min_agreement:
        print(f"error: {path}: int8 top-1 agrees with fp32 PyTorch on {agreement:.1%} of {what} "
              f"< {options.min_agreement:.1%} (max |logit diff| {diff:.3g})", file=sys.stderr)
        return 1
    print(f"wrote {path} (int8, {note}; top-1 agreement with fp32 PyTorch {agreement:.1%} on {what}, "
          f"max |logit diff| {diff:.3g})")
    return 0
