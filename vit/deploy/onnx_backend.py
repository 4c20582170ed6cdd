"""The onnxruntime backend: the model exported to ONNX at the newest opset that both torch's exporter and the
installed onnxruntime handle, kept in the weight-keyed cache, run by an ``InferenceSession``; int8 through
onnxruntime's dynamic quantisation of the blocks' MatMuls."""
from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path

import torch
from torch import nn

from .common import BackendError, Runner, atomic, cache_folder, device_of, first_line, noise, weights_key

# The oldest opset tried: 18 is the first the dynamo exporter writes. Newer ones add fused Attention and Gelu ops
# (23) that onnxruntime runs as single kernels: ViT-S/16 int8 at batch 16 took 1.85x less CPU time than timm at
# opset 23, 1.72x at 18 (one thread, interleaved; fp32 within noise).
OLDEST_OPSET = 18
ORT_MISSING = "onnxruntime: not installed (pip install onnxruntime onnxscript); use --backend eager or openvino"


def exporter_max_opset() -> int:
    """The newest opset torch's ONNX exporter writes."""
    try:
        from torch.onnx._constants import ONNX_MAX_OPSET
    except ImportError:  # the constant moved: the opset every torch with the dynamo exporter knows
        return OLDEST_OPSET
    return int(ONNX_MAX_OPSET)


def export_onnx(model: nn.Module, path: str | Path, opset: int = OLDEST_OPSET) -> Path:
    """ONNX with a dynamic batch dimension (input ``images``, output ``logits``), via torch's dynamo exporter.

    Example:
        >>> export_onnx(vit.load_pretrained("my_vit/"), "model.onnx")  # doctest: +SKIP
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
        program = torch.onnx.export(model.eval(), (noise(model, 2),), dynamo=True, opset_version=opset,
                                    input_names=["images"], output_names=["logits"],
                                    dynamic_shapes={"x": {0: batch}}, verbose=False)
    program.save(str(path))
    import onnx
    onnx.checker.check_model(str(path))
    return path


def export_onnx_newest(model: nn.Module, path: str | Path, opset: int | None = None,
                       threads: int | None = None) -> tuple[Path, int]:
    """(path, opset): ``model`` exported at ``opset`` when given, else at the newest opset that torch's exporter
    writes *and* the installed onnxruntime loads (tried newest first, down to 18); without onnxruntime, the
    exporter's newest. An opset that fails raises only when it was asked for or none is left.

    Example:
        >>> export_onnx_newest(vit.load_pretrained("my_vit/"), "model.onnx")  # doctest: +SKIP
        (PosixPath('model.onnx'), 23)
    """
    try:
        import onnxruntime  # noqa: F401
        runtime = True
    except ImportError:
        runtime = False
    failures = []
    for candidate in [opset] if opset is not None else range(exporter_max_opset(), OLDEST_OPSET - 1, -1):
        try:
            written = export_onnx(model, path, candidate)
            if runtime:
                onnx_session(written, threads)  # an opset or op this onnxruntime lacks fails here
            return written, candidate
        except Exception as error:  # an exporter or runtime without this opset's ops: try the next one
            if opset is not None:
                raise
            failures.append(f"opset {candidate}: {first_line(error)}")
    raise BackendError(f"onnxruntime: exporting the model to ONNX failed ({'; '.join(failures)})")


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
        raise BackendError(ORT_MISSING) from error
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
        raise BackendError(ORT_MISSING) from error
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = arena
    # by default its idle threads spin, taking the cores from torch and the decoding workers between runs
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


def cached_onnx(model: nn.Module, precision: str = "fp32", cache_dir: str | os.PathLike | None = None,
                threads: int | None = None) -> Path:
    """The ONNX file of ``model`` (int8 when ``precision`` is "int8") at the newest opset exporter and runtime
    share, exported once into ``<cache_dir>/onnx`` (default ``$VIT_CACHE_DIR/onnx``, else ``~/.cache/vit/onnx``)
    and reused: the file is named by the weights, torch's and onnxruntime's versions."""
    folder = cache_folder(cache_dir, "onnx")
    base = folder / f"{weights_key(model, 'onnx', _runtime_version())}.onnx"
    if not base.is_file():
        atomic(base, lambda tmp: export_onnx_newest(model, tmp, threads=threads))
    if precision != "int8":
        return base
    quantized = base.with_suffix(".int8.onnx")
    if not quantized.is_file():
        atomic(quantized, lambda tmp: quantize_onnx(base, tmp))
    return quantized


def _runtime_version() -> str:
    try:
        import onnxruntime
        return f"onnxruntime {onnxruntime.__version__}"
    except ImportError:
        return "no onnxruntime"


def build_onnxruntime(model: nn.Module, precision: str, *, threads: int, cache_dir=None, **_) -> Runner:
    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError as error:
        raise BackendError(ORT_MISSING) from error
    if precision == "bf16":
        raise BackendError("onnxruntime bf16: not supported (onnxruntime's CPU kernels have no fast bf16 MatMul); "
                           "use --backend openvino or eager for bf16")
    cpu = device_of(model).type == "cpu"
    if precision == "int8" and not cpu:
        raise BackendError("onnxruntime int8: dynamic quantisation runs on CPU only; move the model to CPU")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if not cpu and \
        "CUDAExecutionProvider" in onnxruntime.get_available_providers() else ["CPUExecutionProvider"]
    path = cached_onnx(model, precision, cache_dir, threads)
    session = onnx_session(path, threads, providers)

    def forward(images: torch.Tensor) -> torch.Tensor:
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = session.run(["logits"], {"images": array})
        return torch.from_numpy(logits).to(images.device)

    return Runner("onnxruntime", precision, model, forward, path=path)
