"""Export a trained model for deployment: ONNX (dynamic batch) and/or ``torch.export`` (``.pt2``).

    vit export CHECKPOINT --onnx model.onnx [--quantize int8] [--pt2 model.pt2] [--opset 18]

CHECKPOINT is anything ``vit.load_pretrained`` reads. The ONNX file takes ``images`` (B, C, H, W), normalised
as the checkpoint's ``pretrained_cfg`` says, and returns ``logits`` (B, num_classes). When onnxruntime is
installed the export is checked against PyTorch (max |difference| printed; over 1e-4 is an error).
``--quantize int8`` writes onnxruntime's dynamic int8 quantisation of it instead (``vit.deploy.runners.quantize_onnx``),
checked against the fp32 PyTorch model: top-1 agreement and max |logit difference| printed, agreement under
``--min-agreement`` is an error. The check runs on ``--check-images`` when given, else on seeded noise.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..models.vision import VisionTransformer
from .runners import onnx_session, top1_agreement


def _example(model: VisionTransformer, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, model.in_chans, *model.img_size, generator=torch.Generator().manual_seed(0))


def compare_onnx(model: VisionTransformer, path: str | Path, images: torch.Tensor | None = None
                 ) -> tuple[float, float] | None:
    """(max |ONNX Runtime - PyTorch| logit difference, top-1 agreement) on ``images`` (default: 3 seeded noise
    images, a batch size other than the export's); None without onnxruntime."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    x = _example(model, 3) if images is None else images
    (got,) = onnx_session(path).run(["logits"], {"images": x.numpy()})
    with torch.no_grad():
        want = model.eval()(x)
    got = torch.from_numpy(got)
    return float((got - want).abs().max()), top1_agreement(got, want)


def check_onnx(model: VisionTransformer, path: str | Path, batch: int = 3) -> float | None:
    """Max |ONNX Runtime - PyTorch| on random input of a batch size other than the export's; None without
    onnxruntime."""
    compared = compare_onnx(model, path, _example(model, batch))
    return None if compared is None else compared[0]


def export_program(model: VisionTransformer, path: str | Path) -> Path:
    """``torch.export`` program with a dynamic batch; reload with ``torch.export.load(path).module()``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model.eval(), (_example(model),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, str(path))
    return path
