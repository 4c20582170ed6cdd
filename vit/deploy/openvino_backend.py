"""The OpenVINO backend (``pip install 'vit[openvino]'``; Intel's runtime, also on AMD and Arm CPUs): the model
converted by ``openvino.convert_model`` to an IR kept in the weight-keyed cache, compiled with the precision's
``INFERENCE_PRECISION_HINT`` (OpenVINO keeps the compiled blob in the cache too, so a second process starts
fast); int8 through NNCF post-training quantisation, calibrated on the user's images (``--calibration DIR``)
else on the probe batch."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .common import BackendError, Runner, atomic, cache_folder, device_of, noise, top1_agreement, weights_key

OPENVINO_MISSING = "openvino: not installed (pip install 'vit[openvino]', i.e. openvino and nncf)"
# bf16 is a hint: OpenVINO runs the model's matmuls in bf16 (AMX / AVX512-BF16) and keeps fp32 where it must
HINTS = {"fp32": "f32", "bf16": "bf16"}


def _openvino():
    try:
        import openvino
    except ImportError as error:
        raise BackendError(OPENVINO_MISSING) from error
    return openvino


@functools.cache
def core():
    """The process's one ``openvino.Core``: each Core holds its own plugins and thread pools, and with a new Core
    per runner a later fork (a DataLoader worker, a subprocess) crashed the process."""
    return _openvino().Core()


def convert(model: nn.Module):
    """The fp32 ``openvino.Model`` of ``model`` with a dynamic batch (input (B, C, H, W) -> logits)."""
    ov = _openvino()
    height, width = model.img_size
    with warnings.catch_warnings():  # torch's tracer notes each shape check it sees as a constant
        warnings.simplefilter("ignore")
        return ov.convert_model(model.eval().cpu(), example_input=noise(model, 2).cpu(),
                                input=[(-1, model.in_chans, height, width)])


def quantize_int8(ov_model, calibration: torch.Tensor):
    """NNCF post-training int8 quantisation of an ``openvino.Model`` (transformer preset: per-channel weights,
    the softmax and layer norms left in float), calibrated on ``calibration`` (N, C, H, W) in batches of one."""
    try:
        import nncf
    except ImportError as error:
        raise BackendError(OPENVINO_MISSING.replace("openvino:", "openvino int8: nncf")) from error
    samples = [image[None].numpy() for image in calibration.detach().cpu().float()]
    nncf.set_log_level(logging.ERROR)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # nncf's torch import: "no CUDA runtime"
    # its progress bars (rich) go to stdout, where a command's results are printed
    with contextlib.redirect_stdout(io.StringIO()):
        return nncf.quantize(ov_model, nncf.Dataset(samples), subset_size=len(samples),
                             model_type=nncf.ModelType.TRANSFORMER)


def save_ir(ov_model, path: Path) -> Path:
    """``path`` (.xml) and its .bin, weights kept fp32 (OpenVINO's default would halve them to fp16)."""
    _openvino().save_model(ov_model, str(path), compress_to_fp16=False)
    return path


def export_openvino(model: nn.Module, folder: str | os.PathLike, precision: str = "fp32",
                    calibration: torch.Tensor | None = None) -> Path:
    """``folder/model.xml`` + ``model.bin``: the OpenVINO IR of ``model`` (fp32 weights; OpenVINO picks bf16 at
    run time where the CPU has it) or, with ``precision="int8"``, its NNCF int8 quantisation calibrated on
    ``calibration`` (default: 32 seeded noise images; pass real ones). Load with ``openvino.Core().read_model``.

    Example:
        >>> export_openvino(vit.load_pretrained("my_vit/"), "my_vit_ir/")  # doctest: +SKIP
        PosixPath('my_vit_ir/model.xml')
    """
    if precision not in ("fp32", "int8"):
        raise ValueError(f"precision: expected fp32 or int8 for an OpenVINO IR (bf16 is chosen when it runs), "
                         f"got {precision!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ov_model = convert(model)
    if precision == "int8":
        ov_model = quantize_int8(ov_model, calibration if calibration is not None else noise(model, 32))
    return save_ir(ov_model, folder / "model.xml")


def cached_ir(model: nn.Module, precision: str, cache_dir: str | os.PathLike | None = None,
              calibration: torch.Tensor | None = None) -> Path:
    """The IR (.xml) of ``model`` in ``<cache_dir>/openvino`` (default ``$VIT_CACHE_DIR/openvino``, else
    ``~/.cache/vit/openvino``), named by its weights and OpenVINO's version; int8 also by its calibration images.
    Converted (and quantised) once, reused after."""
    ov = _openvino()
    folder = cache_folder(cache_dir, "openvino")
    base = folder / f"{weights_key(model, 'openvino', ov.__version__)}.xml"
    if not base.is_file():
        atomic(base, lambda tmp: save_ir(convert(model), tmp))
    if precision != "int8":
        return base
    digest = hashlib.sha256(calibration.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest()[:12]
    quantized = base.with_name(f"{base.stem}.int8-{digest}.xml")
    if not quantized.is_file():
        atomic(quantized, lambda tmp: save_ir(quantize_int8(core().read_model(str(base)), calibration), tmp))
    return quantized


def build_openvino(model: nn.Module, precision: str, *, threads: int, cache_dir=None,
                   calibration: torch.Tensor | None = None, bf16_native: bool = False, **_) -> Runner:
    _openvino()  # not installed: say so before any work
    if device_of(model).type != "cpu":
        raise BackendError("openvino: runs the model on the CPU here; move the model to CPU or use another backend")
    if precision == "int8" and calibration is None:
        raise BackendError("openvino int8: needs calibration images")
    path = cached_ir(model, precision, cache_dir, calibration)
    # int8 leaves the layer norms, softmax and head in float: bf16 where that is native, as OpenVINO would choose
    hint = HINTS.get(precision) or ("bf16" if bf16_native else "f32")
    # one compiled-blob folder per hint: OpenVINO 2026.4 reused an f32 blob for a bf16 compile of the same IR
    # (its cache key misses the hint), which then gave NaN logits
    compiled = core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                       "INFERENCE_NUM_THREADS": threads,
                                                       "CACHE_DIR": str(path.parent / "compiled" / hint)})
    request = compiled.create_infer_request()

    def forward(images: torch.Tensor) -> torch.Tensor:
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        logits = request.infer({0: array})[compiled.output(0)]
        return torch.from_numpy(logits.copy()).to(images.device)

    return Runner("openvino", precision, model, forward, path=path)


def compare_openvino(model: nn.Module, path: str | os.PathLike, images: torch.Tensor) -> tuple[float, float]:
    """(max |OpenVINO - PyTorch| logit difference, top-1 agreement) of the IR at ``path`` on ``images``, compiled
    at fp32 (so an fp32 IR is checked exactly, an int8 one for its quantisation alone)."""
    compiled = core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = torch.from_numpy(compiled(images.detach().cpu().float().numpy())[0].copy())
    with torch.no_grad():
        want = model.eval()(images)
    return float((got - want).abs().max()), top1_agreement(got, want)
