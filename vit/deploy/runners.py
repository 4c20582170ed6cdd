"""Fast inference: a runner for (model, backend, quantize), checked against eager PyTorch when it is built.

    runner = create_runner(model)                                    # backend "auto", fp32
    runner = create_runner(model, "onnxruntime", quantize="int8")    # or "eager" | "compile"; quantize None | "int8"
    logits = runner(images)                                          # (B, C, H, W) float -> (B, num_classes)

Backends (measured by ``benchmarks/inference.py``; README "Inference backends"):

- ``eager``: the model under ``torch.inference_mode``. int8: ``torch.ao`` dynamic quantisation of the blocks'
  ``nn.Linear`` layers (int8 weights per output channel, activations quantised per batch as they arrive).
- ``compile``: ``torch.compile`` with inductor's weight freezing (weights folded in as constants, linear layers
  prepacked for oneDNN). fp32 only; batches smaller than the largest one seen are padded up to it, so a last
  partial batch does not trigger a recompile.
- ``onnxruntime``: the model exported to ONNX (``export_onnx``, the path ``vit export`` writes; opset 23
  with its fused Attention and Gelu ops where exporter and runtime have them, else 18) into a cache keyed by its
  weights (``default_cache_dir``), run by an ``InferenceSession`` with every graph optimisation and torch's
  thread count. int8: onnxruntime's dynamic quantisation of the MatMuls with constant weights.

int8 leaves the patch embedding and the head in fp32: they are a few percent of the work, and the head's rounding
would land directly in the logits. ``backend="auto"`` tries ``AUTO_ORDER[quantize]`` in turn and keeps
the first that builds here and passes verification: its top-1 on a probe batch (the caller's first images, else
seeded noise) must match eager fp32 on every image (fp32) or on at least ``INT8_MIN_AGREEMENT`` of them (int8; one
miss is always allowed).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import logging
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

BACKENDS = ("eager", "compile", "onnxruntime")
QUANTIZE = ("int8",)
# The order "auto" tries, fastest first, from benchmarks/inference.py (ViT-Ti/S, 2 CPU threads; README). compile is
# left out: inductor pays tens of seconds of compilation in every new process for a gain within noise on CPU.
AUTO_ORDER = {None: ("onnxruntime", "eager"), "int8": ("onnxruntime", "eager")}
# int8 changes some answers near a tie; a backend agreeing with fp32 on fewer of the probe's images is broken
INT8_MIN_AGREEMENT = 0.75
PROBE_SIZE = 8


class BackendError(RuntimeError):
    """A backend that cannot run here (missing package or compiler) or whose answers differ from eager fp32."""


class VerificationError(BackendError):
    """A backend that runs, but whose top-1 answers on the probe batch differ from eager fp32's."""


@dataclass
class Runner:
    """A model ready for inference: ``runner(images)`` -> logits. ``model`` is the eager fp32 model it was built
    from (class names, ``img_size``, mean/std); ``agreement``/``max_diff``: top-1 agreement and max |logit
    difference| with eager fp32 on the probe batch (None where not checked)."""
    backend: str
    quantize: str | None
    model: nn.Module
    forward: Callable[[torch.Tensor], torch.Tensor]
    agreement: float | None = None
    max_diff: float | None = None
    path: Path | None = None  # onnxruntime: the ONNX file it runs

    @property
    def name(self) -> str:
        return f"{self.backend} {self.quantize or 'fp32'}"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.forward(images)


def create_runner(model: nn.Module, backend: str = "auto", quantize: str | None = None, *,
                  probe: torch.Tensor | None = None, verify: bool = True, cache_dir: str | os.PathLike | None = None,
                  threads: int | None = None, log: Callable[[str], None] | None = None) -> Runner:
    """The runner for ``backend`` ("auto", "eager", "compile", "onnxruntime") and ``quantize`` (None or "int8").

    A backend that cannot run here raises ``BackendError`` with one line saying why; "auto" then notes it
    through ``log`` (default: stderr) and tries the next one, ending with eager, which always runs.

    Example:
        >>> import vit
        >>> model = vit.VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3)
        >>> runner = create_runner(model, "eager", quantize="int8")
        >>> runner.name, runner(torch.zeros(2, 3, 16, 16)).shape
        ('eager int8', torch.Size([2, 3]))
    """
    quantize = None if quantize in (None, "none", "fp32") else quantize
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend: expected auto or one of {', '.join(BACKENDS)}, got {backend!r}")
    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"quantize: expected none or int8, got {quantize!r}")
    log = log or (lambda message: print(message, file=sys.stderr))
    model = model.eval()
    threads = threads or torch.get_num_threads()
    candidates = AUTO_ORDER[quantize] if backend == "auto" else (backend,)
    if probe is None:
        probe = _noise(model, PROBE_SIZE)
    probe = probe[:PROBE_SIZE]
    reference = None
    for i, name in enumerate(candidates):
        try:
            runner = _BUILDERS[name](model, quantize, threads=threads, cache_dir=cache_dir)
            if verify and (name, quantize) != ("eager", None):
                if reference is None:
                    with torch.inference_mode():
                        reference = model(probe)
                _verify(runner, probe, reference)
            return runner
        except BackendError as error:
            if backend != "auto" or i == len(candidates) - 1:
                raise
            log(f"note: {error}; using {candidates[i + 1]} instead")
    raise AssertionError("unreachable: the last candidate returns or raises")


def top1_agreement(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of rows whose arg-max equals the reference's.

    Example:
        >>> top1_agreement(torch.tensor([[1., 0.], [0., 1.]]), torch.tensor([[2., 0.], [2., 0.]]))
        0.5
    """
    return float((logits.argmax(-1) == reference.argmax(-1)).float().mean())


def _verify(runner: Runner, probe: torch.Tensor, reference: torch.Tensor) -> None:
    try:
        logits = runner(probe).float()
    except BackendError:
        raise
    except Exception as error:  # a compiler or runtime failing on this machine: say so, let auto move on
        raise BackendError(f"{runner.name}: failed on a probe batch ({_first_line(error)})"
                           f"{_COMPILER_HINT if runner.backend == 'compile' else ''}") from error
    runner.agreement = top1_agreement(logits, reference)
    runner.max_diff = float((logits - reference.float()).abs().max())
    agreed = round(runner.agreement * len(probe))
    # fp32: the same top-1 everywhere, except an exact tie broken the other way (then the logits agree closely);
    # int8: most of them (a broken backend gets most wrong), and one flip near a tie is allowed on a small probe
    ok = len(probe) - agreed <= max(1, int((1 - INT8_MIN_AGREEMENT) * len(probe))) if runner.quantize else \
        runner.agreement == 1.0 or runner.max_diff <= 1e-3
    if not ok:
        raise VerificationError(f"{runner.name}: top-1 agrees with eager fp32 on only {agreed} of {len(probe)} "
                                f"probe images (max |logit difference| {runner.max_diff:.3g})")


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
                     if isinstance(module, nn.Linear) and name.startswith("blocks.")}
            return quantize_dynamic(copy.deepcopy(model).cpu().eval(), names, dtype=torch.qint8)
    except (ImportError, AttributeError, RuntimeError) as error:
        raise BackendError(f"eager int8: torch.ao dynamic quantisation is not available in torch "
                           f"{torch.__version__} ({_first_line(error)})") from error


def _eager(model: nn.Module, quantize: str | None, **_) -> Runner:
    if quantize == "int8":
        if _device(model).type != "cpu":
            raise BackendError("eager int8: torch.ao dynamic quantisation runs on CPU only; move the model to CPU")
        quantized = quantize_linear_int8(model)
        return Runner("eager", quantize, model, quantized)
    return Runner("eager", None, model, model)


# ---- compile ----------------------------------------------------------------------------------------------
_COMPILER_HINT = "; torch.compile needs a C++ compiler on CPU (gcc/g++ or clang): install one or use eager"


def _compile(model: nn.Module, quantize: str | None, **_) -> Runner:
    if quantize:
        # torch.ao's quantised linears break inductor's graph at every layer: no faster than eager int8
        raise BackendError("compile int8: not supported (torch.compile splits the int8 model at every layer); "
                           "use --backend onnxruntime or eager with --quantize int8")
    if _device(model).type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise BackendError("compile: no C++ compiler found" + _COMPILER_HINT)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime" on CPU machines
    compiled = torch.compile(model, dynamic=False, options={"freezing": True})
    largest = [0]

    def forward(images: torch.Tensor) -> torch.Tensor:
        # one graph per batch size: pad a smaller batch up to the largest compiled one instead of compiling anew
        n = images.shape[0]
        if n < largest[0]:
            padding = images.new_zeros(largest[0] - n, *images.shape[1:])
            return compiled(torch.cat([images, padding]))[:n]
        largest[0] = n
        return compiled(images)

    return Runner("compile", None, model, forward)


# ---- onnxruntime ------------------------------------------------------------------------------------------
def export_onnx(model: nn.Module, path: str | Path, opset: int = 18) -> Path:
    """ONNX with a dynamic batch dimension (input ``images``, output ``logits``), via torch's dynamo exporter.

    Example:
        >>> export_onnx(vit.load_pretrained("my_vit/"), "model.onnx")  # doctest: +SKIP
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
        program = torch.onnx.export(model.eval(), (_noise(model, 2),), dynamo=True, opset_version=opset,
                                    input_names=["images"], output_names=["logits"],
                                    dynamic_shapes={"x": {0: batch}}, verbose=False)
    program.save(str(path))
    import onnx
    onnx.checker.check_model(str(path))
    return path


def quantize_onnx(source: str | Path, path: str | Path) -> Path:
    """onnxruntime's dynamic int8 quantisation of an ONNX model's MatMuls with constant weights (the blocks'
    linear layers; int8 weights per output channel, uint8 activations quantised per batch). The patch
    embedding (Conv) and head (Gemm) stay fp32.

    Example:
        >>> quantize_onnx("model.onnx", "model.int8.onnx")  # doctest: +SKIP
    """
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as error:
        raise BackendError(_ORT_MISSING) from error
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process the model is for static quantisation
    try:
        quantize_dynamic(str(source), str(path), op_types_to_quantize=["MatMul"], per_channel=True,
                         weight_type=QuantType.QInt8, nodes_to_exclude=_head_nodes(source))
    finally:
        root.setLevel(level)
    return path


def _head_nodes(path: str | Path) -> list[str]:
    # the head is the graph's Gemm (2-D input); dynamic quantisation rewrites a Gemm into "<name>_MatMul" first
    import onnx
    names = [node.name for node in onnx.load(str(path), load_external_data=False).graph.node if node.op_type == "Gemm"]
    return names + [f"{name}_MatMul" for name in names]


def onnx_session(path: str | Path, threads: int | None = None, providers: list[str] | None = None,
                 arena: bool = True):
    """An onnxruntime ``InferenceSession`` with all graph optimisations and ``threads`` intra-op threads
    (default: torch's), one inter-op thread, whose threads sleep between runs; ``arena=False`` returns its
    buffers after each run (slower, but its memory can then be measured per run).

    Example:
        >>> onnx_session("model.onnx").run(["logits"], {"images": images.numpy()})  # doctest: +SKIP
    """
    try:
        import onnxruntime as ort
    except ImportError as error:
        raise BackendError(_ORT_MISSING) from error
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = arena
    # by default its idle threads spin, taking the cores from torch and the decoding workers between runs
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


# ONNX opset 23 has Attention and Gelu ops, which onnxruntime runs as single kernels: ViT-S/16 int8 at batch 16
# took 1.85x less CPU time than timm at opset 23, 1.72x at 18 (one thread, interleaved; fp32 within noise).
# 18 is the fallback for an exporter or runtime without them.
RUNTIME_OPSETS = (23, 18)
_ORT_MISSING = "onnxruntime: not installed (pip install onnxruntime onnxscript); use --backend eager or compile"


def default_cache_dir() -> Path:
    """Where exported ONNX files are kept: ``$VIT_CACHE_DIR/onnx``, else ``~/.cache/vit/onnx``."""
    return Path(os.environ.get("VIT_CACHE_DIR") or Path.home() / ".cache" / "vit") / "onnx"


def weights_key(model: nn.Module, *extra: str) -> str:
    """A short hash of the model's architecture and weights (and ``extra``), naming its cached exports."""
    digest = hashlib.sha256(repr(getattr(model, "config", type(model).__name__)).encode())
    for part in (*extra, torch.__version__):
        digest.update(part.encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:20]


def cached_onnx(model: nn.Module, quantize: str | None = None, cache_dir: str | os.PathLike | None = None,
                opset: int = 18) -> Path:
    """The ONNX file of ``model`` (int8 when ``quantize``), exported once into ``cache_dir`` and reused."""
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    base = folder / f"{weights_key(model, f'opset{opset}')}.onnx"
    if not base.is_file():
        _atomic(base, lambda tmp: export_onnx(model, tmp, opset))
    if quantize != "int8":
        return base
    quantized = base.with_suffix(".int8.onnx")
    if not quantized.is_file():
        _atomic(quantized, lambda tmp: quantize_onnx(base, tmp))
    return quantized


def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    # write next to the target and rename, so a killed export never leaves a half file under the final name
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".tmp-") as tmp:
        write(Path(tmp) / path.name)
        os.replace(Path(tmp) / path.name, path)


def _onnxruntime(model: nn.Module, quantize: str | None, *, threads: int, cache_dir=None) -> Runner:
    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError as error:
        raise BackendError(_ORT_MISSING) from error
    cpu = _device(model).type == "cpu"
    if quantize and not cpu:
        raise BackendError("onnxruntime int8: dynamic quantisation runs on CPU only; move the model to CPU")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if not cpu and \
        "CUDAExecutionProvider" in onnxruntime.get_available_providers() else ["CPUExecutionProvider"]
    failures = []
    for opset in RUNTIME_OPSETS:
        try:
            path = cached_onnx(model, quantize, cache_dir, opset)
            session = onnx_session(path, threads, providers)
            break
        except BackendError:
            raise
        except Exception as error:  # an exporter or runtime without this opset's ops: try the next one
            failures.append(f"opset {opset}: {_first_line(error)}")
    else:
        raise BackendError(f"onnxruntime: exporting the model to ONNX failed ({'; '.join(failures)})")

    def forward(images: torch.Tensor) -> torch.Tensor:
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = session.run(["logits"], {"images": array})
        return torch.from_numpy(logits).to(images.device)

    return Runner("onnxruntime", quantize, model, forward, path=path)


_BUILDERS = {"eager": _eager, "compile": _compile, "onnxruntime": _onnxruntime}


# ---- helpers ----------------------------------------------------------------------------------------------
def _device(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def _noise(model: nn.Module, batch: int) -> torch.Tensor:
    height, width = getattr(model, "img_size", (224, 224))
    return torch.randn(batch, getattr(model, "in_chans", 3), height, width,
                       generator=torch.Generator().manual_seed(0)).to(_device(model))


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"
