"""Throughput of our VisionTransformer next to timm's, same architecture, same weights, same process.

    python benchmarks/throughput.py                                   # Ti/S/B, CPU, 2 threads, fp32
    python benchmarks/throughput.py --compile                         # adds torch.compile rows
    python benchmarks/throughput.py --precision bf16                  # autocast bf16
    python benchmarks/throughput.py --device cuda --batch 128
    python benchmarks/throughput.py --tiny --repeats 1 --warmup 0     # seconds; what the test runs

For each model it prints inference img/s, training-step img/s (forward + backward + AdamW step) and
peak memory of ours and timm, measured A/B/A/B interleaved (so machine noise hits both alike), the
median of ``--repeats`` timed batches after ``--warmup`` untimed ones, and the ratio ours/timm. The
matmul peak (GFLOP/s) is measured in the same run; each row's achieved fraction of it uses FLOPs per
image counted from the architecture (``model_flops``; multiply-add = 2 FLOPs, training = 3x forward).

Peak memory is the growth of the process's memory over one step, above what was live before it
(weights and optimizer state excluded): on CUDA ``torch.cuda.max_memory_allocated``; on CPU the
peak resident set size (Linux ``VmHWM`` after resetting it through ``/proc/self/clear_refs``), so
it includes allocator slack but also works for compiled models whose buffers no Python hook sees.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import timm  # noqa: E402

import vit  # noqa: E402
from vit.models.vision import VisionTransformer  # noqa: E402

DEFAULT_MODELS = "vit_tiny_patch16_224,vit_small_patch16_224,vit_base_patch16_224"
# A tiny architecture for smoke runs: no registry name, built from keyword arguments on both sides.
TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)


# ---- FLOPs and the machine's peak ----------------------------------------------------------------
def model_flops(model: VisionTransformer) -> int:
    """Forward FLOPs per image of a VisionTransformer, from its architecture (multiply-add = 2).

    Counts the matmuls (patch projection, qkv, attention scores and weighted sum, projection, MLP,
    head); norms, GELU, softmax and adds are a few percent and left out, as is usual.

    Example:
        >>> model_flops(vit.create_model("vit_small_patch16_224")) / 1e9  # doctest: +ELLIPSIS
        9.2...
    """
    pe = model.patch_embed
    d = model.embed_dim
    n = pe.num_patches
    t = n + model.num_prefix_tokens
    c, (ph, pw) = model.in_chans, pe.patch_size
    hidden = model.blocks[0].mlp.fc1.out_features if len(model.blocks) else 0
    flops = 2 * n * d * c * ph * pw
    per_block = 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d + 2 * 2 * t * d * hidden
    flops += len(model.blocks) * per_block
    heads = 1 + int(model.head_dist is not None)
    flops += heads * 2 * d * model.num_classes
    return flops


def matmul_peak(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """Measured GFLOP/s of a large square matmul (median of ``repeats``), the practical peak."""
    n = 4096 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    inner = 20 if device.type == "cuda" else 1
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b)
        _sync(device)
        times.append((time.perf_counter() - start) / inner)
    return 2 * n ** 3 / statistics.median(times[1:]) / 1e9


# ---- measurement helpers -------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class PeakMemory:
    """Peak memory growth (bytes) over a block of code: CUDA allocator on GPU, peak RSS on CPU (Linux)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak: int | None = None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = _rss_reset()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.base is not None:
            self.peak = max(_status_kb("VmHWM") * 1024 - self.base, 0)
        return False


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


_LIBC = None


def _return_free_memory() -> None:
    """Make freed memory leave the resident set, so RSS follows live tensors (glibc; a no-op elsewhere).

    glibc keeps freed heap memory resident and raises its mmap threshold as big blocks are freed, so a
    second identical step would show no RSS growth at all. A fixed 64 KiB threshold puts every tensor
    of any size in its own mapping, returned on free; ``malloc_trim`` hands back what is free now.
    Process-wide, so it applies to ours and timm alike (the memory pass runs after the timed one).
    """
    global _LIBC
    try:
        import ctypes
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_reset() -> int | None:
    """Reset the peak-RSS mark to the current RSS and return it in bytes; None where Linux /proc is missing."""
    _return_free_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmRSS") * 1024
    except OSError:
        return None


@dataclass
class Contender:
    """One model under test with its optimizer; ``step`` runs one timed unit of work."""
    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None = None
    times: dict = field(default_factory=lambda: {"infer": [], "train": []})
    memory: dict = field(default_factory=dict)


def _make_optimizer(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    # The fastest correct AdamW: fused kernels where this torch has them for the device, else foreach.
    try:
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)


def _infer(c: Contender, x, device, precision):
    with torch.inference_mode(), _autocast(device, precision):
        c.model(x)


def _train(c: Contender, x, y, device, precision):
    with _autocast(device, precision):
        loss = F.cross_entropy(c.model(x), y)
    loss.backward()
    c.optimizer.step()
    c.optimizer.zero_grad(set_to_none=True)


def _work(c: Contender, mode: str, x, y, device, precision):
    if mode == "infer":
        return lambda: _infer(c, x, device, precision)
    return lambda: _train(c, x, y, device, precision)


def _timed(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


# ---- building the pair -------------------------------------------------------------------------
def build_pair(name: str, device: torch.device, tiny: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """timm's model and ours with the same weights, loaded into ours through our checkpoint loader."""
    torch.manual_seed(0)
    if tiny:
        theirs = timm.models.VisionTransformer(**TINY)
        ours = VisionTransformer(**TINY)
    else:
        theirs = timm.create_model(name, pretrained=False)
        ours = vit.create_model(name)
    load = getattr(vit, "load_pretrained", None)
    if load is not None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "timm.pth"
            torch.save(theirs.state_dict(), path)
            ours = load(str(path), model=ours)
    else:
        ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours.to(device), theirs.to(device)


# ---- one model ---------------------------------------------------------------------------------
def bench_model(name: str, args, device: torch.device) -> list[dict]:
    ours, theirs = build_pair(name, device, args.tiny)
    batch = args.batch or (32 if ("tiny" in name or args.tiny) else 16)
    img = ours.img_size
    x = torch.randn(batch, ours.in_chans, *img, device=device)
    y = torch.randint(0, max(ours.num_classes, 1), (batch,), device=device)
    flops = model_flops(ours)

    contenders = [Contender("ours", ours), Contender("timm", theirs)]
    if args.compile:
        compiled = VisionTransformer(**_config_of(ours)).to(device)
        compiled.load_state_dict(ours.state_dict())
        compiled.compile()  # in place: state-dict keys stay free of `_orig_mod.`
        contenders.insert(1, Contender("ours+compile", compiled))
    for c in contenders:
        c.optimizer = _make_optimizer(c.model, device)

    modes = ["infer"] + (["train"] if not args.no_train else [])
    for mode in modes:
        for c in contenders:
            c.model.train(mode == "train")
            work = _work(c, mode, x, y, device, args.precision)
            for _ in range(args.warmup + (2 if "compile" in c.name else 0)):  # compile needs its first calls
                work()
        for _ in range(args.repeats):  # interleaved A/B/A/B
            for c in contenders:
                c.times[mode].append(_timed(_work(c, mode, x, y, device, args.precision), device))
        for c in contenders:  # memory after the timed passes (it changes glibc's allocator setting)
            with PeakMemory(device) as mem:
                _work(c, mode, x, y, device, args.precision)()
            c.memory[mode] = mem.peak

    rows = []
    timm_c = contenders[-1]
    for mode in modes:
        ref = batch / statistics.median(timm_c.times[mode])
        for c in contenders:
            ips = batch / statistics.median(c.times[mode])
            spread = (max(c.times[mode]) - min(c.times[mode])) / statistics.median(c.times[mode])
            rows.append(dict(model=name if not args.tiny else "tiny", impl=c.name, mode=mode, batch=batch,
                             ips=ips, ratio=ips / ref, gflops=ips * flops * (3 if mode == "train" else 1) / 1e9,
                             mem=c.memory.get(mode), spread=spread))
    del contenders, ours, theirs
    gc.collect()
    return rows


def bench_grad_checkpointing(name: str, args, device: torch.device) -> list[dict]:
    """Peak training-step memory of ours with and without gradient checkpointing (one step each, after warm-up)."""
    torch.manual_seed(0)
    model = (VisionTransformer(**TINY) if args.tiny else vit.create_model(name)).to(device).train()
    batch = args.batch or (32 if args.tiny else 16)
    x = torch.randn(batch, model.in_chans, *model.img_size, device=device)
    y = torch.randint(0, max(model.num_classes, 1), (batch,), device=device)
    c = Contender("ours", model, _make_optimizer(model, device))
    rows = []
    for enabled in (False, True):
        model.set_grad_checkpointing(enabled)
        for _ in range(max(args.warmup, 1)):
            _train(c, x, y, device, args.precision)
        with PeakMemory(device) as mem:
            seconds = _timed(lambda: _train(c, x, y, device, args.precision), device)
        rows.append(dict(model=name if not args.tiny else "tiny", checkpointing=enabled, batch=batch,
                         mem=mem.peak, ips=batch / seconds, saved=saved_for_backward(model, x)))
    return rows


def saved_for_backward(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps from one forward pass for the backward pass: an exact count, unlike peak memory, which
    the allocator's caching and other processes blur (checkpointed blocks keep only their inputs)."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(x)
    out.float().sum().backward()
    model.zero_grad(set_to_none=True)
    return total


def _config_of(model: VisionTransformer) -> dict:
    return dict(img_size=model.img_size, patch_size=model.patch_size, in_chans=model.in_chans,
                num_classes=model.num_classes, embed_dim=model.embed_dim, depth=len(model.blocks),
                num_heads=model.blocks[0].attn.num_heads, mlp_ratio=model.blocks[0].mlp.fc1.out_features
                / model.embed_dim, qkv_bias=model.blocks[0].attn.qkv.bias is not None,
                global_pool=model.global_pool, class_token=model.cls_token is not None,
                distilled=model.distilled)


def _mb(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2 ** 20:.0f}"


def print_tables(peak: float, rows: list[dict], ckpt_rows: list[dict], file=None) -> None:
    file = file or sys.stdout
    print(f"\nmatmul peak: {peak:.1f} GFLOP/s\n", file=file)
    print("| model | impl | mode | batch | img/s | ours/timm | GFLOP/s | % of peak | peak mem MB | spread |", file=file)
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|", file=file)
    for r in rows:
        print(f"| {r['model']} | {r['impl']} | {r['mode']} | {r['batch']} | {r['ips']:.1f} | {r['ratio']:.2f} | "
              f"{r['gflops']:.1f} | {100 * r['gflops'] / peak:.0f}% | {_mb(r['mem'])} | {100 * r['spread']:.0f}% |",
              file=file)
    if ckpt_rows:
        print("\n| model | grad checkpointing | batch | train-step peak mem MB | img/s (one step) |", file=file)
        print("|---|---|---:|---:|---:|", file=file)
        for r in ckpt_rows:
            print(f"| {r['model']} | {'on' if r['checkpointing'] else 'off'} | {r['batch']} | {_mb(r['mem'])} | "
                  f"{r['ips']:.1f} |", file=file)
        off, on = ckpt_rows[0]["mem"], ckpt_rows[1]["mem"]
        if off and on is not None:
            print(f"\ngradient checkpointing cuts peak training-step memory by {100 * (1 - on / off):.0f}%", file=file)


def parse_args(args=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated registry names")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=None, help="default: 32 for tiny models, 16 otherwise")
    p.add_argument("--compile", action="store_true", help="also time ours under torch.compile (inductor)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--repeats", type=int, default=5, help="timed batches per contender and mode")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches first")
    p.add_argument("--no-train", action="store_true", help="inference only")
    p.add_argument("--grad-ckpt-model", default="vit_base_patch16_224",
                   help="model for the gradient-checkpointing memory row ('' to skip)")
    p.add_argument("--tiny", action="store_true", help="a tiny 32 px, depth-2 model instead of --models (smoke test)")
    return p.parse_args(args)


def main(args=None) -> tuple[float, list[dict], list[dict]]:
    args = parse_args(args)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on both sides
    peak = matmul_peak(device, dtype)
    models = ["tiny"] if args.tiny else [m for m in args.models.split(",") if m]
    print(f"torch {torch.__version__}, timm {timm.__version__}, device {_device_name(device)}, "
          f"threads {torch.get_num_threads()}, precision {args.precision}, repeats {args.repeats}, "
          f"warmup {args.warmup}", flush=True)
    rows = []
    for name in models:
        rows += bench_model(name, args, device)
        print(f"  done {name}", file=sys.stderr, flush=True)
    ckpt_rows = []
    if args.grad_ckpt_model and not args.no_train:
        ckpt_rows = bench_grad_checkpointing(args.grad_ckpt_model, args, device)
    print_tables(peak, rows, ckpt_rows)
    return peak, rows, ckpt_rows


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine


if __name__ == "__main__":
    main()
