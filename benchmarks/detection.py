"""Detection speed and memory: ViT-S/16 + simple feature pyramid + Faster R-CNN (global attention, and ViTDet's
windowed attention) next to torchvision's ``fasterrcnn_resnet50_fpn`` (same heads, CNN backbone), in one run.

    python benchmarks/detection.py                                        # 256 and 512 px, batch 2, CPU
    python benchmarks/detection.py --device cuda --batch 8 --repeats 10
    python benchmarks/detection.py --tiny --sizes 64 --batch 1 --repeats 1 --warmup 0   # seconds; the test's run

Rows per input size: ``vit-s16 global`` (every block global), ``vit-s16 window`` (window 14, global blocks 2, 5,
8, 11: ViTDet-B's layout, depth 12 like ViT-S) and ``resnet50-fpn`` (torchvision, ``weights=None``,
``weights_backbone=None``). Every detector resizes to the same size (``min_size = max_size = size``), has 91 classes
with the background, and gets the same random images with three random boxes each. Training = forward with
targets, the summed loss dict, backward, AdamW step; inference = eval-mode forward (NMS included) under
``torch.inference_mode``. The ``(ViT only)`` rows time the backbone alone (forward + backward + AdamW step), where
windowed attention's effect is not diluted by the pyramid and heads; they also report the bytes autograd saves
for backward in one forward (``saved_for_backward``: each storage once, weights excluded), a figure that other
processes and the allocator cannot disturb, and the forward FLOPs per image (torch's counter, attention as
matmuls). Times are the median of ``--repeats`` timed batches after ``--warmup`` untimed ones.

Peak memory is the growth over the timed steps above what was live before them (weights, and for training the
optimizer state after the warm-up, excluded), measured as ``benchmarks/throughput.py`` does: on CUDA
``torch.cuda.max_memory_allocated``; on CPU the peak resident set size (Linux ``VmHWM``, reset through
``/proc/self/clear_refs``, freed memory handed back to the OS first), so it counts allocator slack too.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark's memory probe

from throughput import PeakMemory, _sync  # noqa: E402

from vit.tasks.backbone import Backbone  # noqa: E402
from vit.tasks.detection import ObjectDetector  # noqa: E402

NUM_CLASSES = 91  # with the background: torchvision's COCO detectors
WINDOW = dict(window_size=14, global_attn_indexes=(2, 5, 8, 11))  # ViTDet-B's layout (depth 12)
TINY_ARCH = dict(embed_dim=64, depth=4, num_heads=2, patch_size=16)
TINY_WINDOW = dict(window_size=2, global_attn_indexes=(1, 3))


def build(name: str, size: int, tiny: bool) -> torch.nn.Module:
    """One detector (a torchvision ``GeneralizedRCNN``-style module) taking images and targets."""
    if name == "resnet50-fpn":
        from torchvision.models.detection import fasterrcnn_resnet50_fpn
        return fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=NUM_CLASSES, min_size=size,
                                       max_size=size)
    arch = dict(TINY_ARCH) if tiny else dict(arch="vit_small_patch16_224")
    if name.endswith("window"):
        arch.update(TINY_WINDOW if tiny else WINDOW)
    module = ObjectDetector(Backbone(img_size=size, **arch), num_classes=NUM_CLASSES - 1, image_size=size)
    return module.detector


def inputs(batch: int, size: int, device: torch.device, seed: int = 0):
    """Random images and three random boxes (labels 1..90) per image, the same for every detector."""
    generator = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, size, size, generator=generator).to(device) for _ in range(batch)]
    targets = []
    for _ in range(batch):
        xy = torch.rand(3, 2, generator=generator) * size * 0.6
        wh = (0.1 + 0.3 * torch.rand(3, 2, generator=generator)) * size
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).to(device),
                        "labels": torch.randint(1, NUM_CLASSES, (3,), generator=generator).to(device)})
    return images, targets


def _train_step(model, optimizer, images, targets) -> None:
    loss = sum(model(images, targets).values())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _infer(model, images) -> None:
    with torch.inference_mode():
        model(images)


def measure(work, device: torch.device, warmup: int, repeats: int) -> tuple[float, int | None]:
    """(median seconds of ``repeats`` calls after ``warmup`` ones, peak memory growth over the timed calls)."""
    for _ in range(warmup):
        work()
    times = []
    with PeakMemory(device) as memory:
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            work()
            _sync(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times), memory.peak


def bench(name: str, size: int, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build(name, size, args.tiny).to(device)
    images, targets = inputs(args.batch, size, device)
    row = {"size": size, "model": name, "params": sum(p.numel() for p in model.parameters())}
    model.eval()
    seconds, row["infer_mem"] = measure(lambda: _infer(model, images), device, args.warmup, args.repeats)
    row["infer_ips"] = args.batch / seconds
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    # one untimed step first, always: AdamW creates its state there, and it belongs to the weights, not the step
    _train_step(model, optimizer, images, targets)
    seconds, row["train_mem"] = measure(lambda: _train_step(model, optimizer, images, targets), device,
                                        max(0, args.warmup - 1), args.repeats)
    row["train_ips"] = args.batch / seconds
    del model, optimizer
    return row


def bench_backbone(name: str, size: int, args, device: torch.device) -> dict:
    """The ViT alone (``vit-s16`` rows only), forward + backward + AdamW step of its patch tokens' mean: where the
    attention's share of time and memory shows undiluted by the pyramid and the heads."""
    torch.manual_seed(0)
    arch = dict(TINY_ARCH) if args.tiny else dict(arch="vit_small_patch16_224")
    if name.endswith("window"):
        arch.update(TINY_WINDOW if args.tiny else WINDOW)
    model = Backbone(img_size=size, **arch).build(num_classes=0).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(args.batch, 3, size, size, device=device)

    def step() -> None:
        model.forward_features(x).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # AdamW's state, as in bench()
    seconds, memory = measure(step, device, max(0, args.warmup - 1), args.repeats)
    row = {"size": size, "model": f"{name} (ViT only)", "train_ips": args.batch / seconds, "train_mem": memory,
           "saved": saved_for_backward(lambda: model.forward_features(x).mean(), model),
           "gflops": forward_flops(lambda: model.forward_features(x[:1])) / 1e9}
    del model, optimizer
    return row


def saved_for_backward(forward, model: torch.nn.Module) -> int:
    """Bytes of the activations autograd keeps for backward in one ``forward()`` (each storage once, weights left
    out): what a training step must hold at its peak beyond weights and optimizer state, independent of the
    allocator and of other processes."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sum(seen.values())


def forward_flops(forward) -> int:
    """FLOPs of one forward (torch's counter; multiply-add = 2) with attention spelt out as matmuls, so the
    attention's share is counted (the fused kernels are invisible to the counter)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        forward()
    return counter.get_total_flops()


def _mb(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2 ** 20:.0f}"


def print_table(rows: list[dict], args, device: torch.device, file=None) -> None:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    memory = "CUDA max_memory_allocated growth" if device.type == "cuda" else "peak RSS growth"
    vit = "a tiny ViT (64 wide, 4 blocks, window 2) in place of ViT-S/16" if args.tiny else "ViT-S/16"
    print(f"\ndetection, batch {args.batch}, {where}, median of {args.repeats} after {args.warmup} warm-up; "
          f"memory: {memory} over the step (MB); vit-s16 rows: {vit}", file=file)
    print("| size | model | params (M) | train img/s | train peak MB | infer img/s | infer peak MB | saved for "
          "backward MB | GFLOPs / image |", file=file)
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|", file=file)
    for r in rows:
        if "params" in r:
            print(f"| {r['size']} | {r['model']} | {r['params'] / 1e6:.1f} | {r['train_ips']:.2f} | "
                  f"{_mb(r['train_mem'])} | {r['infer_ips']:.2f} | {_mb(r['infer_mem'])} | | |", file=file)
        else:  # the ViT alone: training step only
            print(f"| {r['size']} | {r['model']} | | {r['train_ips']:.2f} | {_mb(r['train_mem'])} | | | "
                  f"{_mb(r['saved'])} | {r['gflops']:.1f} |", file=file)


def parse_args(args=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="256,512", help="input sizes (square), comma-separated")
    parser.add_argument("--batch", type=int, default=2, help="images per step")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per row (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--models", default="vit-s16 global,vit-s16 window,resnet50-fpn",
                        help="rows, comma-separated: vit-s16 global, vit-s16 window, resnet50-fpn")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--vit-only", action="store_true", help="only the (ViT only) rows: skip the detectors")
    parser.add_argument("--tiny", action="store_true",
                        help="a 64-wide, 4-block ViT (window 2, global blocks 1, 3) instead of ViT-S: a smoke run")
    options = parser.parse_args(args)
    known = ("vit-s16 global", "vit-s16 window", "resnet50-fpn")
    options.models = [m.strip() for m in options.models.split(",") if m.strip()]
    unknown = [m for m in options.models if m not in known]
    if unknown:
        parser.error(f"--models: unknown {unknown}; expected some of {', '.join(known)}")
    try:
        options.sizes = [int(s) for s in options.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes: expected comma-separated integers, got {options.sizes!r}")
    if any(s % 16 for s in options.sizes) or min(options.sizes) < 32:
        parser.error(f"--sizes: expected multiples of the patch size 16, at least 32, got {options.sizes}")
    if options.batch < 1 or options.repeats < 1 or options.warmup < 0:
        parser.error("--batch and --repeats must be >= 1, --warmup >= 0")
    return options


def main(args=None) -> list[dict]:
    options = parse_args(args)
    if options.threads:
        torch.set_num_threads(options.threads)
    device = torch.device(options.device)
    rows = []
    for size in options.sizes:
        print(f"benchmarking {size} px ...", file=sys.stderr, flush=True)
        if not options.vit_only:
            rows += [bench(name, size, options, device) for name in options.models]
        rows += [bench_backbone(name, size, options, device) for name in options.models if name.startswith("vit")]
    print_table(rows, options, device)
    return rows


if __name__ == "__main__":
    main()
