"""Fast inference: a runner for (model, backend, precision), checked against eager PyTorch fp32 when it is built.

    runner = create_runner(model)                                      # backend "auto", precision "auto"
    runner = create_runner(model, "openvino", "int8", calibration=x)   # or eager | compile | onnxruntime; fp32 | bf16
    logits = runner(images)                                            # (B, C, H, W) float -> (B, num_classes)
    runner = create_runner(Embedder(model, "avg"), compare="cosine")   # embeddings: checked by cosine similarity
    print(runner.name, runner.reason)                                  # e.g. "openvino bf16", why it was chosen

Backends (measured by ``benchmarks/inference.py``; docs/deploy.md):

- ``eager``: the model under ``torch.inference_mode``. bf16: ``torch.autocast``. int8: ``torch.ao`` dynamic
  quantisation of the blocks' ``nn.Linear`` layers (int8 weights per output channel, activations per batch).
- ``compile``: ``torch.compile`` with inductor's weight freezing; bf16 under autocast. Batches smaller than the
  largest one seen are padded up to it, so a last partial batch does not trigger a recompile.
- ``onnxruntime``: the model exported to ONNX (``onnx_backend``) at the newest opset exporter and runtime share,
  cached by its weights, run by an ``InferenceSession``. int8: onnxruntime's dynamic quantisation of the MatMuls.
- ``openvino`` (``pip install 'vit[openvino]'``): the model converted to OpenVINO's IR (``openvino_backend``),
  cached by its weights, compiled with the precision hint. int8: NNCF post-training quantisation, calibrated on
  ``calibration`` (the user's images) else on the probe batch.

Precisions: ``fp32``; ``bf16`` only where the hardware runs it natively (``vit.utils.hardware.native_bf16``, the
check training's ``precision: auto`` uses) — asking for it elsewhere is a ``BackendError``; ``int8``; ``auto``.
"auto" (backend, precision or both) tries the candidates of ``vit.deploy.order.candidates`` in turn — the order
``benchmarks/inference.py --save-order`` measured on this machine, else ``DEFAULT_ORDER`` — dropping bf16 where it
is not native, and keeps the first that builds here and whose top-1 on the probe batch (the caller's first images,
else seeded noise) agrees with eager fp32: on every image (fp32, or logits within 1e-3 on a tie) or on at least
``AUTO_MIN_AGREEMENT`` of them (bf16, int8). Each refusal is one line through ``log``. A backend and precision
both named are checked more leniently for bf16 and int8 (``INT8_MIN_AGREEMENT``; one flip near a tie is allowed).

``compare="cosine"`` is the check for a model that gives embeddings (``vit.features.Embedder``): an image agrees when
the cosine similarity of its output with eager fp32's is at least ``COSINE_AGREEMENT`` (per-token outputs are
flattened, one vector per image); fp32 needs every image at ``FP32_COSINE`` or outputs within 1e-3. The shares
asked of bf16 and int8 are the same as for top-1.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import sys
import warnings
from typing import Callable

import torch
from torch import nn

from ..utils.hardware import native_bf16
from .common import (PRECISIONS, BackendError, Runner, VerificationError, default_cache_dir, device_of,  # noqa: F401
                     first_line, noise, top1_agreement, weights_key)
from .onnx_backend import (build_onnxruntime, cached_onnx, export_onnx, export_onnx_newest,  # noqa: F401
                           onnx_session, quantize_onnx)
from .openvino_backend import build_openvino
from .order import candidates

BACKENDS = ("eager", "compile", "onnxruntime", "openvino")
AUTO_MIN_AGREEMENT = 0.99  # what "auto" asks of a bf16 or int8 candidate on the probe batch
INT8_MIN_AGREEMENT = 0.75  # a named bf16 / int8 backend agreeing on fewer of the probe's images is broken
COSINE_AGREEMENT = 0.99  # compare="cosine": an image's bf16 / int8 embedding agrees with fp32's at this cosine
FP32_COSINE = 0.9999  # compare="cosine": what every image's fp32 embedding must reach (else outputs within 1e-3)
COMPARES = ("top1", "cosine")
PROBE_SIZE = 16
_UNSET = object()


def create_runner(model: nn.Module, backend: str = "auto", precision: str | None = "auto", *,
                  quantize=_UNSET, probe: torch.Tensor | None = None, calibration: torch.Tensor | None = None,
                  verify: bool = True, cache_dir: str | os.PathLike | None = None, threads: int | None = None,
                  log: Callable[[str], None] | None = None, order_file: str | os.PathLike | None = None,
                  compare: str = "top1") -> Runner:
    """The runner for ``backend`` ("auto", "eager", "compile", "onnxruntime", "openvino") and ``precision``
    ("auto", "fp32", "bf16", "int8"); ``quantize="int8"``, the old spelling, still means ``precision="int8"``.

    A backend or precision that cannot run here raises ``BackendError`` with one line saying why; "auto" then
    notes it through ``log`` (default: stderr) and tries the next candidate, ending with eager, which always runs.
    The choice is logged as one line, ``runner: <backend> <precision> (<how it was chosen>)``; ``runner.reason``
    holds the part in brackets. ``calibration``: images for int8 quantisation that needs them
    (OpenVINO/NNCF), else the probe. Exported files are cached under ``cache_dir`` (default ``$VIT_CACHE_DIR``,
    else ``~/.cache/vit``) in ``onnx/`` and ``openvino/``.

    Example:
        >>> import vit
        >>> model = vit.VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3)
        >>> runner = create_runner(model, "eager", "int8")
        >>> runner.name, runner(torch.zeros(2, 3, 16, 16)).shape
        ('eager int8', torch.Size([2, 3]))
    """
    precision = _precision(precision, quantize)
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend: expected auto or one of {', '.join(BACKENDS)}, got {backend!r}")
    if compare not in COMPARES:
        raise ValueError(f"compare: expected one of {', '.join(COMPARES)}, got {compare!r}")
    log = log or (lambda message: print(message, file=sys.stderr))
    model = model.eval()
    device = device_of(model)
    native, why = native_bf16(device)
    if precision == "bf16" and not native:
        raise BackendError(f"precision bf16: not native here ({why}); use fp32 or int8")
    threads = threads or torch.get_num_threads()
    chosen_by_auto = "auto" in (backend, precision)
    if chosen_by_auto:
        tries, source = candidates(backend, precision, device, order_file)
        tries = [pair for pair in tries if pair[1] != "bf16" or native]  # never emulated bf16
        reason = f"auto: {source}"
    else:
        tries, reason = [(backend, precision)], "as asked"
    probe = (noise(model, PROBE_SIZE) if probe is None else probe)[:PROBE_SIZE]
    reference = None
    for i, (name, kind) in enumerate(tries):
        try:
            runner = _build(name, kind, model, threads=threads, cache_dir=cache_dir, bf16_native=native,
                            calibration=calibration if calibration is not None else probe)
            if verify and (name, kind) != ("eager", "fp32"):
                if reference is None:
                    with torch.inference_mode():
                        reference = model(probe)
                _verify(runner, probe, reference, AUTO_MIN_AGREEMENT if chosen_by_auto else None, compare)
            runner.reason = reason
            log(f"runner: {runner.name} ({reason})")
            return runner
        except BackendError as error:
            if not chosen_by_auto or i == len(tries) - 1:
                raise
            log(f"note: {error}; trying {' '.join(tries[i + 1])}")
    raise AssertionError("unreachable: the last candidate returns or raises")


def _build(backend: str, precision: str, model: nn.Module, **options) -> Runner:
    try:
        return _BUILDERS[backend](model, precision, **options)
    except BackendError:
        raise
    except Exception as error:  # an exporter, converter or quantiser failing on this model: one line, auto moves on
        raise BackendError(f"{backend} {precision}: could not be built ({first_line(error)})") from error


def _precision(precision: str | None, quantize) -> str:
    # None / "none" were the old "no quantisation": fp32
    precision = "fp32" if precision in (None, "none") else precision
    if quantize is not _UNSET:
        old = "fp32" if quantize in (None, "none", "fp32") else quantize
        if old != "int8" and old != "fp32":
            raise ValueError(f"quantize: expected none or int8 (quantize is now precision: fp32 | bf16 | int8 | "
                             f"auto), got {quantize!r}")
        if precision not in ("auto", old):
            raise ValueError(f"quantize={quantize!r} and precision={precision!r} disagree: give precision only")
        warnings.warn("create_runner(quantize=...) is now precision=...: use precision='int8' or 'fp32'",
                      DeprecationWarning, stacklevel=3)
        precision = old
    if precision != "auto" and precision not in PRECISIONS:
        raise ValueError(f"precision: expected auto or one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def _verify(runner: Runner, probe: torch.Tensor, reference: torch.Tensor, least: float | None,
            compare: str = "top1") -> None:
    """Raise VerificationError unless ``runner`` agrees with eager fp32 on the probe: fp32 on every image (or
    outputs within 1e-3); bf16/int8 on ``least`` of them when given, else on all but a quarter (at least one
    image allowed to differ). An image agrees by top-1, or with ``compare="cosine"`` by the cosine similarity of
    its output (``COSINE_AGREEMENT``; fp32 ``FP32_COSINE``)."""
    try:
        outputs = runner(probe).float()
    except BackendError:
        raise
    except Exception as error:  # a compiler or runtime failing on this machine: say so, let auto move on
        raise BackendError(f"{runner.name}: failed on a probe batch ({first_line(error)})"
                           f"{_COMPILER_HINT if runner.backend == 'compile' else ''}") from error
    reference = reference.float()
    if outputs.shape != reference.shape:
        raise VerificationError(f"{runner.name}: gives outputs of shape {tuple(outputs.shape)}, eager fp32 "
                                f"{tuple(reference.shape)}")
    runner.max_diff = float((outputs - reference).abs().max())
    if compare == "cosine":
        cosine = cosine_similarities(outputs, reference)
        runner.cosine = float(cosine.min())
        threshold = FP32_COSINE if runner.precision == "fp32" else COSINE_AGREEMENT
        runner.agreement = float((cosine >= threshold).float().mean())
        measure, detail = f"cosine similarity >= {threshold:g} with eager fp32", f"lowest cosine {runner.cosine:.6f}, "
    else:
        runner.agreement = top1_agreement(outputs, reference)
        measure, detail = "top-1 agrees with eager fp32", ""
    agreed = round(runner.agreement * len(probe))
    if runner.precision == "fp32":
        ok, needed = runner.agreement == 1.0 or runner.max_diff <= 1e-3, "all"
    elif least is not None:
        ok, needed = runner.agreement >= least, f"{least:.0%}"
    else:
        ok, needed = len(probe) - agreed <= max(1, int((1 - INT8_MIN_AGREEMENT) * len(probe))), \
            f"{INT8_MIN_AGREEMENT:.0%}"
    if not ok:
        what = "logit" if compare == "top1" else "output"
        raise VerificationError(f"{runner.name}: {measure} on only {agreed} of {len(probe)} probe images, needs "
                                f"{needed} ({detail}max |{what} difference| {runner.max_diff:.3g})")


def cosine_similarities(outputs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(B,) cosine similarity of each image's output with the reference's, outputs flattened per image (so
    per-token embeddings (B, N, D) count as one vector each). Two zero vectors agree fully.

    Example:
        >>> cosine_similarities(torch.tensor([[1., 0.], [0., 2.]]), torch.tensor([[2., 0.], [1., 0.]])).tolist()
        [1.0, 0.0]
    """
    a, b = outputs.float().flatten(1), reference.float().flatten(1)
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12)
    both_zero = (a.abs().amax(1) == 0) & (b.abs().amax(1) == 0)
    return torch.where(both_zero, torch.ones_like(cosine), cosine)


def _autocast(model: nn.Module, precision: str):
    return torch.autocast(device_of(model).type, dtype=torch.bfloat16) if precision == "bf16" else \
        contextlib.nullcontext()


# ---- eager ------------------------------------------------------------------------------------------------
def quantize_linear_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose transformer blocks' ``nn.Linear`` layers are dynamically quantised to int8
    (``torch.ao``: weights per output channel, activations per batch); the rest stays fp32. CPU only.

    Example:
        >>> import vit
        >>> model = vit.VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3)
        >>> quantized = quantize_linear_int8(model)
        >>> type(quantized.blocks[0].mlp.fc1).__module__, type(quantized.head).__module__
        ('torch.ao.nn.quantized.dynamic.modules.linear', 'torch.nn.modules.linear')
    """
    try:
        with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao on every use
            warnings.simplefilter("ignore")
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
            names = {name: per_channel_dynamic_qconfig for name, module in model.named_modules()
                     if isinstance(module, nn.Linear) and f".{name}".count(".blocks.")}
            return quantize_dynamic(copy.deepcopy(model).cpu().eval(), names, dtype=torch.qint8)
    except (ImportError, AttributeError, RuntimeError) as error:
        raise BackendError(f"eager int8: torch.ao dynamic quantisation is not available in torch "
                           f"{torch.__version__} ({first_line(error)})") from error


def _eager(model: nn.Module, precision: str, **_) -> Runner:
    if precision == "int8":
        if device_of(model).type != "cpu":
            raise BackendError("eager int8: torch.ao dynamic quantisation runs on CPU only; move the model to CPU")
        return Runner("eager", precision, model, quantize_linear_int8(model))

    def forward(images: torch.Tensor) -> torch.Tensor:
        with _autocast(model, precision):
            return model(images)

    return Runner("eager", precision, model, forward)


# ---- compile ----------------------------------------------------------------------------------------------
_COMPILER_HINT = "; torch.compile needs a C++ compiler on CPU (gcc/g++ or clang): install one or use eager"


def _compile(model: nn.Module, precision: str, **_) -> Runner:
    if precision == "int8":
        # torch.ao's quantised linears break inductor's graph at every layer: no faster than eager int8
        raise BackendError("compile int8: not supported (torch.compile splits the int8 model at every layer); "
                           "use --backend onnxruntime, openvino or eager with --precision int8")
    if device_of(model).type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise BackendError("compile: no C++ compiler found" + _COMPILER_HINT)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime" on CPU machines
    compiled = torch.compile(model, dynamic=False, options={"freezing": True})
    largest = [0]

    def forward(images: torch.Tensor) -> torch.Tensor:
        # one graph per batch size: pad a smaller batch up to the largest compiled one instead of compiling anew
        n = images.shape[0]
        with _autocast(model, precision):
            if n < largest[0]:
                padding = images.new_zeros(largest[0] - n, *images.shape[1:])
                return compiled(torch.cat([images, padding]))[:n]
            largest[0] = n
            return compiled(images)

    return Runner("compile", precision, model, forward)


_BUILDERS = {"eager": _eager, "compile": _compile, "onnxruntime": build_onnxruntime, "openvino": build_openvino}
