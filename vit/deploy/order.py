"""The order ``create_runner(backend="auto")`` tries backend x precision in: measured on this machine by
``benchmarks/inference.py`` and cached in ``$VIT_CACHE_DIR/inference_order.json`` (else
``~/.cache/vit/inference_order.json``), one entry per machine key (CPU model and its matmul flags, or the GPU,
plus the torch / onnxruntime / openvino versions). Without an entry for this machine, ``DEFAULT_ORDER``."""
from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import torch

from .common import atomic

# Without a measurement: bf16 first where it is native (create_runner drops it elsewhere), OpenVINO before eager
# (ViT-S/16 on a 2-core AMX CPU: OpenVINO bf16 ~5x timm eager fp32, eager bf16 autocast ~3x). int8 and
# onnxruntime are left to a measurement: int8 changes answers near a tie, and onnxruntime fp32 ran slower than
# eager there (0.87x).
DEFAULT_ORDER = (("openvino", "bf16"), ("eager", "bf16"), ("openvino", "fp32"), ("eager", "fp32"))
# With one precision asked for and no measurement: the backends tried, in this order
DEFAULT_BACKENDS = {"fp32": ("openvino", "eager"), "bf16": ("openvino", "eager"),
                    "int8": ("openvino", "onnxruntime", "eager")}
# With one backend asked for and no measurement: its precisions tried, in this order
DEFAULT_PRECISIONS = {"eager": ("bf16", "fp32"), "compile": ("bf16", "fp32"), "onnxruntime": ("fp32",),
                      "openvino": ("bf16", "fp32")}
# The CPU flags that decide which kernels run (x86: AVX2 / AVX-512 / VNNI / AMX; Arm: bf16 / i8mm / sve)
_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",
          "bf16", "i8mm", "sve", "sve2", "asimddp")


def order_file() -> Path:
    """``$VIT_CACHE_DIR/inference_order.json``, else ``~/.cache/vit/inference_order.json``."""
    return Path(os.environ.get("VIT_CACHE_DIR") or Path.home() / ".cache" / "vit") / "inference_order.json"


def machine(device: str | torch.device = "cpu") -> dict:
    """What the measured order depends on: the processor (CPU model and flags, or the GPU) and library versions."""
    device = torch.device(device)
    found = {"arch": platform.machine(), "torch": torch.__version__}
    for library in ("onnxruntime", "openvino"):
        try:
            found[library] = __import__(library).__version__
        except ImportError:
            found[library] = None
    if device.type == "cuda":
        found["gpu"] = torch.cuda.get_device_name(device)
    else:
        found["cpu"], flags = _cpu_description()
        found["flags"] = sorted(set(flags) & set(_FLAGS))
    return found


def machine_key(device: str | torch.device = "cpu") -> str:
    """A short hash of ``machine(device)``: the entry of the order file that applies here."""
    return hashlib.sha256(json.dumps(machine(device), sort_keys=True).encode()).hexdigest()[:16]


def _cpu_description() -> tuple[str, list[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:  # not Linux: the name is all there is
        return platform.processor() or platform.machine(), []
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)  # the last CPU's fields
    fields = {key.strip().lower(): value.strip() for key, value in fields.items()}
    name = fields.get("model name") or fields.get("cpu part") or platform.processor() or platform.machine()
    return name, (fields.get("flags") or fields.get("features") or "").split()


def measured_order(device: str | torch.device = "cpu", path: str | os.PathLike | None = None
                   ) -> list[tuple[str, str]] | None:
    """The (backend, precision) order measured on this machine, fastest first, or None without one."""
    path = Path(path) if path is not None else order_file()
    try:
        entry = json.loads(path.read_text(encoding="utf-8")).get(machine_key(device))
    except (OSError, ValueError, AttributeError):  # none written yet, or unreadable: measure again to replace it
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("order"), list):
        return None
    return [tuple(item.split(" ", 1)) for item in entry["order"] if isinstance(item, str) and " " in item]


def save_order(order: list[tuple[str, str]], device: str | torch.device = "cpu",
               path: str | os.PathLike | None = None, **details) -> Path:
    """Record ``order`` (fastest first) as this machine's in the order file, beside other machines' entries;
    ``details`` (e.g. the img/s measured) are kept with it for people to read."""
    path = Path(path) if path is not None else order_file()
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        entries = entries if isinstance(entries, dict) else {}
    except (OSError, ValueError):
        entries = {}
    entries[machine_key(device)] = {"order": [f"{backend} {precision}" for backend, precision in order],
                                    "machine": machine(device), **details}
    atomic(path, lambda tmp: tmp.write_text(json.dumps(entries, indent=1), encoding="utf-8"))
    return path


def candidates(backend: str, precision: str, device: str | torch.device = "cpu",
               path: str | os.PathLike | None = None) -> tuple[list[tuple[str, str]], str]:
    """(the (backend, precision) pairs to try in turn, where the order came from) for a request in which either
    may be "auto". bf16 pairs are kept here; ``create_runner`` drops them where bf16 is not native."""
    measured = measured_order(device, path)
    source = f"order measured here ({path or order_file()})" if measured else \
        "default order (none measured here: python benchmarks/inference.py --save-order)"
    order = measured or []
    if backend == "auto" and precision == "auto":
        found = order or list(DEFAULT_ORDER)
        last = ("eager", "fp32")
    elif backend == "auto":
        found = [pair for pair in order if pair[1] == precision] or \
            [(name, precision) for name in DEFAULT_BACKENDS[precision]]
        last = ("eager", precision)
    else:
        found = [pair for pair in order if pair[0] == backend] or \
            [(backend, name) for name in DEFAULT_PRECISIONS.get(backend, ("fp32",))]
        last = (backend, "fp32")
    if last not in found:
        found.append(last)  # always something that runs
    return found, source
