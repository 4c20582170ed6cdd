"""Export a trained model for deployment: ONNX (dynamic batch) and/or ``torch.export`` (``.pt2``).

    python -m vit.export CHECKPOINT --onnx model.onnx [--pt2 model.pt2] [--opset 18]

CHECKPOINT is anything ``vit.load_pretrained`` reads. The ONNX file takes ``images`` (B, C, H, W), normalised
as the checkpoint's ``pretrained_cfg`` says, and returns ``logits`` (B, num_classes). When onnxruntime is
installed the export is checked against PyTorch (max |difference| printed; over 1e-4 is an error).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from .checkpoints import CheckpointError
from .model import VisionTransformer
from .predict import load_model, one_line


def _example(model: VisionTransformer, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, model.in_chans, *model.img_size, generator=torch.Generator().manual_seed(0))


def export_onnx(model: VisionTransformer, path: str | Path, opset: int = 18) -> Path:
    """ONNX with a dynamic batch dimension (input ``images``, output ``logits``), via torch's dynamo exporter.

    Example:
        >>> export_onnx(vit.load_pretrained("my_vit/"), "model.onnx")  # doctest: +SKIP
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(model.eval(), (_example(model),), dynamo=True, opset_version=opset,
                                input_names=["images"], output_names=["logits"],
                                dynamic_shapes={"x": {0: batch}}, verbose=False)
    program.save(str(path))
    import onnx
    onnx.checker.check_model(str(path))
    return path


def check_onnx(model: VisionTransformer, path: str | Path, batch: int = 3) -> float | None:
    """Max |ONNX Runtime - PyTorch| on random input of a batch size other than the export's; None without
    onnxruntime."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    x = _example(model, batch)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"images": x.numpy()})
    with torch.no_grad():
        want = model.eval()(x)
    return float((torch.from_numpy(got) - want).abs().max())


def export_program(model: VisionTransformer, path: str | Path) -> Path:
    """``torch.export`` program with a dynamic batch; reload with ``torch.export.load(path).module()``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model.eval(), (_example(model),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, str(path))
    return path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vit.export", description="Export a model to ONNX / torch.export.")
    parser.add_argument("checkpoint", help="our .ckpt, a save_pretrained directory, or any source vit.load_pretrained reads")
    parser.add_argument("--onnx", help="ONNX file to write (dynamic batch)")
    parser.add_argument("--pt2", help="torch.export program to write (.pt2, dynamic batch)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max ONNX Runtime vs PyTorch difference")
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
    try:
        model = load_model(options.checkpoint)
    except (CheckpointError, ValueError, OSError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    if options.onnx:
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


if __name__ == "__main__":
    sys.exit(main())
