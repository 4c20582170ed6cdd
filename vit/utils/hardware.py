"""What the hardware runs natively: the one check that training's ``precision: auto`` and inference's
``create_runner(precision="auto")`` both ask, so the two never disagree about a machine."""
from __future__ import annotations

import platform

import torch


def native_bf16(device: str | torch.device = "cpu") -> tuple[bool, str]:
    """(whether ``device`` runs bf16 matmuls natively, why): a CUDA GPU of the Ampere generation or later, a CPU with
    AVX512-BF16 or AMX (x86) or the BF16 extension (Arm). Elsewhere bf16 is emulated, many times slower than fp32.

    Example:
        >>> native, why = native_bf16("cpu")
        >>> isinstance(native, bool) and why.startswith("CPU")
        True
    """
    kind = torch.device(device).type
    if kind == "cuda":
        try:
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # an older torch, without the including_emulation argument
            native = torch.cuda.is_bf16_supported()
        return (True, "CUDA GPU with native bf16") if native else (False, "CUDA GPU without native bf16")
    if kind == "cpu":
        if _cpu_has_native_bf16():
            return True, "CPU with native bf16"
        return False, "CPU without native bf16: no AVX512-BF16 or AMX, so bf16 would be emulated"
    return False, f"{kind}: native bf16 not known"


def _cpu_has_native_bf16() -> bool:
    if platform.machine().lower() in ("arm64", "aarch64"):
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # the BF16 extension on Arm
    # oneDNN's own check also says yes for plain AVX-512, where bf16 is emulated, so ask for the instructions
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)
