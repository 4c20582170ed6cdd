"""Inference backends next to timm eager: img/s, ratio to timm, peak memory and top-1 agreement on real images.

    python benchmarks/inference.py                                   # ViT-Ti/16 + ViT-S/16, 224 px, batch 1 and 16
    python benchmarks/inference.py --models vit_small_patch16_224 --batches 16
    python benchmarks/inference.py --images digits --save-order      # measure, and make it auto's order here
    python benchmarks/inference.py --tiny --repeats 1 --backends eager,onnxruntime   # seconds; what the test runs

Contenders, all in one process and timed round-robin (timm, ours, onnxruntime, ..., timm, ours, ...), so machine
noise hits them alike: timm eager fp32 (the baseline) and ours through each backend x precision of
``vit.deploy.runners`` (eager, onnxruntime, openvino, and compile when asked; fp32, bf16 where the hardware has it
natively, int8). img/s is the median of ``--repeats`` timed batches after ``--warmup`` untimed ones; ``build s``
is the one-time cost (quantisation, export, compilation) including the first batch; ``share of matmul peak`` is
the model's FLOPs x img/s over the best 2048^2 matmul FLOP/s this CPU reached in that precision (measured
before and after the timings; the best of both).

``--save-order`` records ours at the largest batch, fastest first, keeping only those that agree with eager fp32
on the real test photos (fp32 on all, bf16 / int8 on >= 99 %), as this machine's order for
``create_runner(backend="auto")`` (``vit.deploy.order``: ``$VIT_CACHE_DIR/inference_order.json``, else
``~/.cache/vit/inference_order.json``, keyed by CPU model and flags and library versions).

Speed that changes answers does not count, so every contender runs on real photos: CIFAR-10 test images from
``../shared/data/cifar10_small.tgz`` when it is there (else scikit-learn's digits), resized to the model's size.
No pretrained weights can be downloaded here, so each model is seeded random weights with its head fitted (ridge
regression on the features of ``--train-images`` photos) to the ten classes: the logits then have the margins of a
classifier of real images, and ``top-1 agree`` is the share of timed images whose top-1 equals ours eager fp32's.

Peak memory is the growth of the resident set over one batch above what was live before it (weights excluded),
as in ``throughput.py``; onnxruntime's arena keeps its buffers, so its row is measured with a session without one.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # throughput.py's helpers

import timm  # noqa: E402
from throughput import PeakMemory, _device_name, build_pair  # noqa: E402

from vit.data.transforms import eval_transform  # noqa: E402
from vit.deploy.order import save_order  # noqa: E402
from vit.deploy.runners import BackendError, create_runner, onnx_session, top1_agreement  # noqa: E402
from vit.models.vision import VisionTransformer  # noqa: E402

DEFAULT_MODELS = "vit_tiny_patch16_224,vit_small_patch16_224"
# cifar10_small, a .tgz or its folder (12,000 CIFAR-10 photos as train/<class>/*.jpg and test/<class>/*.jpg, 32 px): give it with
# --cifar PATH or $VIT_CIFAR10_SMALL (docs/performance.md shows how to write one from CIFAR-10); the default is
# where the project's CI keeps its copy, beside the repository
CIFAR = Path(os.environ.get("VIT_CIFAR10_SMALL")
             or Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10_small.tgz")
# (impl, backend, precision); bf16 rows only where the hardware runs bf16 natively (else a row saying why)
CONTENDERS = [("timm", "eager", "fp32"), ("ours", "eager", "fp32"), ("ours", "compile", "fp32"),
              ("ours", "onnxruntime", "fp32"), ("ours", "openvino", "fp32"),
              ("ours", "eager", "bf16"), ("ours", "openvino", "bf16"),
              ("ours", "eager", "int8"), ("ours", "onnxruntime", "int8"), ("ours", "openvino", "int8")]
TARGET_AUTO, TARGET_BEST, TARGET_AGREEMENT = 4.0, 5.0, 0.99


# ---- real images --------------------------------------------------------------------------------------------
def real_images(train: int, test: int, source: str = "auto", seed: int = 0) -> tuple[str, tuple, tuple]:
    """(source, (train images, labels), (test images, labels)): HWC uint8 images, shuffled with ``seed``."""
    if source == "cifar" and not CIFAR.exists():
        raise SystemExit(f"--images cifar: {CIFAR} is not there")
    if source in ("auto", "cifar") and CIFAR.exists():
        return "CIFAR-10 photos (32 px)", _cifar("train", train, seed), _cifar("test", test, seed)
    from vit.data.datasets import load_digits_arrays
    images, labels = load_digits_arrays(3)
    order = np.random.default_rng(seed).permutation(len(images))
    images, labels = images[order], labels[order]
    test = min(test, len(images) // 4)  # 1,797 digits: keep a quarter for testing when asked for more
    train = min(train, len(images) - test)
    return "scikit-learn digits (8 px)", (images[test:test + train], labels[test:test + train]), \
        (images[:test], labels[:test])


def _cifar(split: str, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image
    photos = []
    if CIFAR.is_dir():  # the folder itself: split/<class>/*.jpg
        for path in sorted((CIFAR / split).glob("*/*.jpg")):
            photos.append((f"{split}/{path.parent.name}/{path.name}", np.asarray(Image.open(path).convert("RGB"))))
    else:
        _read_archive(split, photos)
    photos.sort(key=lambda item: item[0])
    classes = sorted({Path(name).parent.name for name, _ in photos})
    picked = [photos[i] for i in np.random.default_rng(seed).permutation(len(photos))[:count]]
    return np.stack([image for _, image in picked]), np.asarray([classes.index(Path(name).parent.name)
                                                                 for name, _ in picked])


def _read_archive(split: str, photos: list) -> None:
    from PIL import Image
    with tarfile.open(CIFAR, "r:gz") as archive:  # one pass: random access into a .tgz decompresses from the start
        for member in archive:
            if member.isfile() and f"/{split}/" in member.name and member.name.endswith(".jpg"):
                data = archive.extractfile(member).read()
                photos.append((member.name, np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))))


def to_batch(model, images: np.ndarray) -> torch.Tensor:
    transform = eval_transform(model.img_size, timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD)
    return torch.stack([transform(image=image)["image"] for image in images])


# ---- agreement: a model trained here on the photos ---------------------------------------------------------
AGREEMENT_MODEL = dict(img_size=32, patch_size=8, embed_dim=192, depth=4, num_heads=3, num_classes=10)
# the 8 px digits: a smaller model reaches ~90 % in seconds, so its logits have a trained model's margins
DIGITS_MODEL = dict(img_size=16, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=10)


def train_model(x: torch.Tensor, y: np.ndarray, seconds: float, batch: int = 64, lr: float = 3e-3,
                seed: int = 0, config: dict = AGREEMENT_MODEL, flip: bool = True) -> VisionTransformer:
    """A ViT-Ti-wide (192), 4-block, 32 px (patch 8) model trained from scratch for ``seconds`` (AdamW, flips,
    cosine LR over the time budget)."""
    torch.manual_seed(seed)
    model = VisionTransformer(**config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    labels = torch.as_tensor(y)
    start, step = time.perf_counter(), 0
    generator = torch.Generator().manual_seed(seed)
    while (elapsed := time.perf_counter() - start) < seconds:
        for group in optimizer.param_groups:  # cosine over the time budget
            group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * min(elapsed / seconds, 1.0)))
        index = torch.randint(0, len(x), (batch,), generator=generator)
        images = x[index]
        if flip:  # photos: a mirrored cat is a cat (a mirrored digit is not)
            images = torch.where(torch.rand(batch, 1, 1, 1, generator=generator) < 0.5, images, images.flip(-1))
        loss = torch.nn.functional.cross_entropy(model(images), labels[index], label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
    model.steps = step
    return model.eval()


def bench_agreement(args, photos) -> list[dict]:
    """Each backend and precision of the trained model against its eager fp32: top-1 agreement, max |logit diff|."""
    (train_x, train_y), (test_x, test_y) = photos
    config = DIGITS_MODEL if train_x.shape[1] <= 8 else AGREEMENT_MODEL
    model = VisionTransformer(**config)
    model = train_model(to_batch(model, train_x), train_y, args.train_seconds, config=config,
                        flip=config is AGREEMENT_MODEL)
    images = to_batch(model, test_x)
    with torch.inference_mode():
        reference = torch.cat([model(images[i:i + 256]) for i in range(0, len(images), 256)])
    accuracy = float((reference.argmax(-1).numpy() == test_y).mean())
    print(f"  agreement model: {model.steps} steps of 64 in {args.train_seconds:.0f} s, fp32 accuracy "
          f"{accuracy:.3f} on {len(images)} test photos", file=sys.stderr, flush=True)
    rows = []
    for impl, backend, precision in CONTENDERS:
        if impl == "timm" or backend not in args.backends:
            continue
        row = dict(backend=backend, precision=precision, images=len(images), reference_accuracy=accuracy)
        try:  # int8 (OpenVINO) calibrated on training photos, never on the test photos it is judged on
            runner = create_runner(model, backend, precision, verify=False, threads=args.threads,
                                   cache_dir=args.cache_dir, calibration=to_batch(model, train_x[:32]),
                                   log=lambda line: None)
            logits = torch.cat([runner(images[i:i + 256]) for i in range(0, len(images), 256)])
        except BackendError as error:
            rows.append(dict(row, missing=str(error)))
            continue
        rows.append(dict(row, agreement=top1_agreement(logits, reference),
                         max_diff=float((logits - reference).abs().max()),
                         accuracy=float((logits.argmax(-1).numpy() == test_y).mean())))
    return rows


# ---- speed --------------------------------------------------------------------------------------------------
def build(ours, theirs, impl, backend, precision, probe, threads, cache_dir):
    """(callable on a batch, seconds to build it and run the probe, the runner or None, why it is missing)."""
    start = time.perf_counter()
    if impl == "timm":
        def forward(x):
            with torch.inference_mode():
                return theirs(x)
        forward(probe)
        return forward, time.perf_counter() - start, None, None
    try:
        # seeded weights give near-tied logits: answers are compared on the trained model (bench_agreement)
        runner = create_runner(ours, backend, precision, probe=probe, verify=False, threads=threads,
                               cache_dir=cache_dir, log=lambda line: None)
        runner(probe)  # compile: the compilation happens here
    except Exception as error:  # a backend that cannot run here is a row saying why, not the end of the run
        return None, 0.0, None, str(error).splitlines()[0] if str(error) else type(error).__name__
    return runner, time.perf_counter() - start, runner, None


def bench_speed(name: str, args, images: np.ndarray) -> list[dict]:
    ours, theirs = build_pair(name, torch.device("cpu"), args.tiny)
    ours.eval(), theirs.eval()
    images = to_batch(ours, images)

    def make(impl, backend, precision, probe):
        forward, seconds, runner, missing = build(ours, theirs, impl, backend, precision, probe, args.threads,
                                                  args.cache_dir)
        print(f"  {name}: built {impl} {backend} {precision} for batch {len(probe)} in {seconds:.1f} s" +
              (f" (unavailable: {missing})" if missing else ""), file=sys.stderr, flush=True)
        return dict(impl=impl, backend=backend, precision=precision, forward=forward, build=seconds, runner=runner,
                    missing=missing)

    built = {spec: make(*spec, images[:max(args.batches)]) for spec in CONTENDERS
             if spec[0] == "timm" or (spec[1] in args.backends and spec[1] != "compile")}
    flops = _flops_per_image(ours, images[:1])
    rows = []
    for batch in args.batches:
        contenders = []
        for spec in CONTENDERS:
            if spec[1] == "compile" and "compile" in args.backends:
                # inductor compiles one graph per batch size (the runner pads smaller batches): one per size here
                contenders.append(make(*spec, images[:batch]))
            elif spec in built:
                contenders.append(built[spec])
        live = [c for c in contenders if c["forward"] is not None]
        batches = [images[(i * batch) % len(images):][:batch] for i in range(args.repeats + args.warmup)]
        batches = [b if len(b) == batch else images[:batch] for b in batches]
        for c in live:
            c["times"] = []
            for x in batches[:args.warmup]:
                c["forward"](x)
        for x in batches[args.warmup:]:  # round-robin: the same batch through every contender in turn
            for c in live:
                start = time.perf_counter()
                c["forward"](x)
                c["times"].append(time.perf_counter() - start)
        timm_ips = batch / statistics.median(live[0]["times"])
        for c in contenders:
            row = dict(model=name if not args.tiny else "tiny", batch=batch, impl=c["impl"], backend=c["backend"],
                       precision=c["precision"], build=c["build"], missing=c["missing"])
            if c["forward"] is not None:
                ips = batch / statistics.median(c["times"])
                row.update(ips=ips, ratio=ips / timm_ips, mem=_memory(c, batches[-1], args.threads), flops=flops,
                           spread=(max(c["times"]) - min(c["times"])) / statistics.median(c["times"]))
            rows.append(row)
    return rows


def _flops_per_image(model, image: torch.Tensor) -> float:
    """Multiply-adds x 2 of one forward pass (torch's FLOP counter: matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(image)
    return float(counter.get_total_flops())


def matmul_peaks(threads: int, size: int = 2048, repeats: int = 5) -> dict[str, float | None]:
    """FLOP/s of a square matmul on this CPU per precision, best of ``repeats``: the ceiling each precision's
    rows are a share of. fp32 and bf16 through torch (oneDNN; bf16 only where native), int8 through
    ``torch._int_mm`` (int8 x int8 -> int32) where this torch has it on CPU."""
    from vit.utils.hardware import native_bf16
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=generator), torch.randn(size, size, generator=generator)
    kernels = {"fp32": (a, b, torch.mm)}
    if native_bf16("cpu")[0]:
        kernels["bf16"] = (a.bfloat16(), b.bfloat16(), torch.mm)
    kernels["int8"] = (a.mul(20).to(torch.int8), b.mul(20).to(torch.int8), torch._int_mm)
    peaks = {}
    for precision, (x, y, mm) in kernels.items():
        try:
            mm(x, y)
            best = min(_seconds(lambda: mm(x, y)) for _ in range(repeats))
            peaks[precision] = 2 * size ** 3 / best
        except (RuntimeError, NotImplementedError, AttributeError):  # no int8 matmul on this CPU in this torch
            peaks[precision] = None
    return peaks


def _seconds(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def _memory(contender: dict, x: torch.Tensor, threads: int) -> int | None:
    forward, runner = contender["forward"], contender["runner"]
    if runner is not None and runner.backend == "onnxruntime":  # measure with a session that has no arena
        session = onnx_session(runner.path, threads, arena=False)
        forward = lambda x: session.run(["logits"], {"images": x.numpy()})  # noqa: E731
        forward(x)
    with PeakMemory(torch.device("cpu")) as memory:
        forward(x)
    return memory.peak


# ---- report -------------------------------------------------------------------------------------------------
def _mb(value):
    return "n/a" if value is None else f"{value / 2 ** 20:.0f}"


def _agreement(agreement: list[dict], backend: str, precision: str) -> float | None:
    if backend == "eager" and precision == "fp32":
        return 1.0  # the reference itself (timm: the same weights and ops)
    return next((r.get("agreement") for r in agreement if (r["backend"], r["precision"]) == (backend, precision)),
                None)


def print_tables(rows: list[dict], agreement: list[dict], file=None) -> None:
    file = file or sys.stdout
    print("| model | batch | impl | backend | precision | img/s | vs timm eager | share of matmul peak | peak mem MB | "
          "top-1 agree | build s | spread |", file=file)
    print("|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|", file=file)
    for r in rows:
        head = f"| {r['model']} | {r['batch']} | {r['impl']} | {r['backend']} | {r['precision']} |"
        if r.get("ips") is None:
            print(f"{head} unavailable: {r['missing']} | | | | | | |", file=file)
            continue
        agree = _agreement(agreement, r["backend"], r["precision"])
        share = "n/a" if r.get("peak_share") is None else f"{100 * r['peak_share']:.0f}%"
        print(f"{head} {r['ips']:.1f} | {r['ratio']:.2f} | {share} | {_mb(r['mem'])} | "
              f"{'n/a' if agree is None else f'{100 * agree:.1f}%'} | {r['build']:.1f} | {100 * r['spread']:.0f}% |",
              file=file)
    if agreement:
        first = agreement[0]
        print(f"\ntop-1 agreement with eager fp32 on {first['images']} real test photos, model trained here "
              f"(fp32 accuracy {first['reference_accuracy']:.3f}):\n", file=file)
        print("| backend | precision | top-1 agreement | max abs logit diff | accuracy |", file=file)
        print("|---|---|---:|---:|---:|", file=file)
        for r in agreement:
            if r.get("agreement") is None:
                print(f"| {r['backend']} | {r['precision']} | unavailable: {r['missing']} | | |", file=file)
            else:
                print(f"| {r['backend']} | {r['precision']} | {100 * r['agreement']:.1f}% | {r['max_diff']:.2g} | "
                      f"{r['accuracy']:.3f} |", file=file)


def measured_order(rows: list[dict], agreement: list[dict]) -> list[dict]:
    """Ours at the largest batch of the last model, fastest first, keeping only what agrees with eager fp32 on the
    real test photos (fp32: on every one; bf16 / int8: >= 99 %): the order ``create_runner``'s auto tries."""
    measured = [r for r in rows if r.get("ips") is not None and r["impl"] == "ours"]
    if not measured:
        return []
    model, batch = measured[-1]["model"], max(r["batch"] for r in measured)
    chosen = [r for r in measured if r["model"] == model and r["batch"] == batch]

    def agrees(r):
        agree = _agreement(agreement, r["backend"], r["precision"])
        return agree is not None and agree >= (1.0 if r["precision"] == "fp32" else TARGET_AGREEMENT)

    return sorted((r for r in chosen if agrees(r) and r["backend"] != "compile"), key=lambda r: -r["ips"])


def targets(rows: list[dict], agreement: list[dict], file=None) -> dict:
    """The issue's targets at the largest batch of the last model: auto's choice (the first of the measured order)
    >= 4x timm eager fp32 and the best path >= 5x, both with >= 99 % top-1 agreement."""
    file = file or sys.stdout
    order = measured_order(rows, agreement)
    if not order:
        return {}
    best = max(order, key=lambda r: r["ratio"])
    where = f"{order[0]['model']}, batch {order[0]['batch']}"
    for label, row, target in (("auto's choice", order[0], TARGET_AUTO), ("best path", best, TARGET_BEST)):
        print(f"target: {label} >= {target}x timm eager fp32 ({where}): {row['backend']} {row['precision']} "
              f"{row['ratio']:.2f}x (top-1 agreement {100 * _agreement(agreement, row['backend'], row['precision']):.1f}%)"
              f" -> {'met' if row['ratio'] >= target else 'not met'}", file=file)
    return {"auto": order[0], "best": best}


def parse_args(args=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated registry names")
    p.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    p.add_argument("--backends", default="eager,onnxruntime,openvino",
                   help="ours: which backends to run (add compile to time torch.compile too)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch and onnxruntime)")
    p.add_argument("--repeats", type=int, default=8, help="timed batches per contender and batch size")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches first")
    p.add_argument("--train-images", type=int, default=5000, help="photos the agreement model is trained on")
    p.add_argument("--train-seconds", type=float, default=90, help="training time of the agreement model")
    p.add_argument("--test-images", type=int, default=1000, help="photos agreement is measured on")
    p.add_argument("--cifar", type=Path, default=None,
                   help="cifar10_small (.tgz or its folder) for --images cifar/auto (default: $VIT_CIFAR10_SMALL, else CI's copy "
                        "beside the repository)")
    p.add_argument("--images", choices=["auto", "cifar", "digits"], default="auto",
                   help="real images: CIFAR-10 photos from shared/data, or scikit-learn's digits (auto: CIFAR if there)")
    p.add_argument("--tiny", action="store_true", help="a tiny 32 px, depth-2 model instead of --models (smoke test)")
    p.add_argument("--cache-dir", default=None, help="where ONNX / OpenVINO exports go (default: a temporary folder)")
    p.add_argument("--save-order", action="store_true",
                   help="record the measured order (fastest first, agreeing ones only) as this machine's for "
                        "create_runner's auto, in --order-file")
    p.add_argument("--order-file", default=None,
                   help="default $VIT_CACHE_DIR/inference_order.json, else ~/.cache/vit/inference_order.json")
    args = p.parse_args(args)
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.backends = [b for b in args.backends.split(",") if b]
    return args


def main(args=None) -> tuple[list[dict], list[dict]]:
    args = parse_args(args)
    torch.set_num_threads(args.threads)
    try:
        import onnxruntime
        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = "not installed"
    if args.cifar is not None:
        global CIFAR
        CIFAR = args.cifar
    source, train, test = real_images(args.train_images, args.test_images, args.images)
    models = ["tiny"] if args.tiny else [m for m in args.models.split(",") if m]
    print(f"torch {torch.__version__}, timm {timm.__version__}, onnxruntime {ort_version}, "
          f"{_device_name(torch.device('cpu'))}, threads {torch.get_num_threads()}, repeats {args.repeats}, "
          f"warmup {args.warmup}; images: {source}", flush=True)
    args.peaks = matmul_peaks(args.threads)
    print("matmul peak (2048^2, GFLOP/s): " + ", ".join(f"{k} {'n/a' if v is None else f'{v / 1e9:.0f}'}"
                                                       for k, v in args.peaks.items()), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.cache_dir is None:
            args.cache_dir = tmp
        agreement = bench_agreement(args, (train, test))
        rows = []
        for name in models:
            rows += bench_speed(name, args, test[0][:64])
    # the peak again at the end, the best of both: on shared cores one measurement can land in a busy moment
    for precision, peak in matmul_peaks(args.threads).items():
        args.peaks[precision] = max(filter(None, (peak, args.peaks.get(precision))), default=None)
    for r in rows:
        peak = args.peaks.get(r["precision"])
        r["peak_share"] = r["flops"] * r["ips"] / peak if r.get("ips") and peak else None
    print("matmul peak, best of start and end (GFLOP/s): " + ", ".join(
        f"{k} {'n/a' if v is None else f'{v / 1e9:.0f}'}" for k, v in args.peaks.items()))
    print()
    print_tables(rows, agreement)
    print()
    targets(rows, agreement)
    order = measured_order(rows, agreement)
    if args.save_order and order:
        path = save_order([(r["backend"], r["precision"]) for r in order], path=args.order_file,
                          measured_on=f"{order[0]['model']}, batch {order[0]['batch']}, {args.threads} threads",
                          img_per_s={f"{r['backend']} {r['precision']}": round(r["ips"], 1) for r in order})
        print(f"auto's order for this machine: {', '.join(r['backend'] + ' ' + r['precision'] for r in order)} "
              f"(written to {path})")
    return rows, agreement


if __name__ == "__main__":
    main()
