"""Accuracy per minute: a small-data recipe trained from scratch under several time budgets, each run the way a
user runs it (``python train.py --config configs/small_data.yaml --data.root DIR --trainer.max_time ...``: fit
with the schedule fitted to the budget, then test the final weights), one after the other.

    python benchmarks/small_data.py                           # 5, 10, 20, 60 min on cifar10_small (~1 h 45 min)
    python benchmarks/small_data.py --minutes 20              # one budget
    python benchmarks/small_data.py --tiny                    # seconds: a synthetic folder; what the test runs
    python benchmarks/small_data.py --task detection --minutes 5 10 15   # configs/detection/small_data.yaml, test
                                                              # mAP@50 on a seeded shapes set written in COCO layout
    python benchmarks/small_data.py --task segmentation --minutes 5 10 15   # configs/segmentation/small_data.yaml,
                                                              # test mIoU on a seeded shapes set written as a mask folder

The score is the test accuracy (classification), the test mAP@50 (detection) or the test mIoU (segmentation).

Prints a table (budget, epochs trained, wall time, best validation and final test accuracy), writes it as
``results.csv`` and, where matplotlib is installed, the accuracy-vs-minutes curve as ``accuracy_vs_minutes.png``
under ``--out``. Nothing else should run on the machine meanwhile: the schedule fits whatever step rate it sees.
"""
from __future__ import annotations

import argparse
import csv
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from train_loop import CIFAR, image_folder  # noqa: E402

TINY = ["--model.backbone.embed_dim", "32", "--model.backbone.depth", "1", "--model.backbone.num_heads", "2", "--data.batch_size", "16",
        "--data.num_workers", "0"]
# per task: the recipe, the line run_default prints, the validation metric, and what the score is called
TASKS = {
    "classification": {"config": "configs/small_data.yaml", "val": "val/acc", "score": "test accuracy",
                       "result": re.compile(r"test accuracy: (?P<score>[0-9.]+) on (?P<n>\d+) held-out")},
    "detection": {"config": "configs/detection/small_data.yaml", "val": "val/map_50", "score": "test mAP@50",
                  "result": re.compile(r"test mAP@50: (?P<score>[0-9.]+), mAP: [0-9.na]+ on (?P<n>\d+) held-out")},
    "segmentation": {"config": "configs/segmentation/small_data.yaml", "val": "val/miou", "score": "test mIoU",
                     "result": re.compile(r"test mIoU: (?P<score>[0-9.]+), pixel accuracy: [0-9.na]+ on "
                                          r"(?P<n>\d+) held-out")},
}
# the seeded shapes sets standing in for a small user dataset: scenes per split, their size (tiny: a smoke run)
SHAPES_SPLITS = {"train": 1000, "val": 150, "test": 200}
TINY_SPLITS = {"train": 32, "val": 8, "test": 8}


def shapes_coco(workdir: Path, tiny: bool = False) -> Path:
    """A seeded shapes set written in COCO layout (train/val/test), the size of a small user dataset: 1000
    training scenes of about 96 px with up to 6 objects each (tiny: 32 scenes of 32 px)."""
    from vit.data.coco import write_coco
    from vit.data.shapes import SHAPES_CLASSES, make_shapes

    counts, size = (TINY_SPLITS, 32) if tiny else (SHAPES_SPLITS, 96)
    root = workdir / "shapes_coco"
    for seed, (split, n) in enumerate(counts.items()):
        write_coco(make_shapes(n, size=size, seed=100 + seed, max_objects=6), list(SHAPES_CLASSES), root, split)
    return root


def shapes_masks(workdir: Path, tiny: bool = False) -> Path:
    """The same kind of seeded shapes set written as a mask folder (``images/<split>``, ``masks/<split>`` index
    PNGs, ``classes.txt``): 1000 training scenes of 96 px with up to 6 shapes each (tiny: 32 scenes of 32 px)."""
    from vit.data.masks import write_mask_folder
    from vit.data.shapes import SHAPES_SEGMENTATION_CLASSES, make_shape_masks

    counts, size = (TINY_SPLITS, 32) if tiny else (SHAPES_SPLITS, 96)
    root = workdir / "shapes_masks"
    for seed, (split, n) in enumerate(counts.items()):
        write_mask_folder(make_shape_masks(n, size=size, seed=100 + seed, max_objects=6),
                          list(SHAPES_SEGMENTATION_CLASSES), root, split)
    return root


def cifar10_small(workdir: Path) -> Path:
    """cifar10_small unpacked as it ships (train/ and test/; the CLI holds validation images out of train/)."""
    with tarfile.open(CIFAR) as archive:
        archive.extractall(workdir, filter="data")
    return next(p.parent for p in workdir.rglob("train") if p.is_dir())


def max_time(seconds: float) -> str:
    """Lightning's ``DD:HH:MM:SS``."""
    s = int(round(seconds))
    return f"00:{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def read_metrics(run: Path, val_key: str = "val/acc") -> dict:
    """Epochs trained and the best validation score, from the run's ``metrics.csv``."""
    files = sorted(run.rglob("metrics.csv"))
    epochs, best_val = 0, float("nan")
    if files:
        with open(files[-1], newline="") as f:
            rows = list(csv.DictReader(f))
        vals = [float(r[val_key]) for r in rows if r.get(val_key)]
        best_val = max(vals) if vals else best_val
        epochs = len(vals)
    return {"epochs": epochs, "best_val": best_val}


def read_run(run: Path, seconds: float, wall: float | None = None, task: str = "classification") -> dict:
    """A finished budget run's row, from the output it left in ``run``."""
    text = (run / "stdout.log").read_text()
    found = TASKS[task]["result"].search(text)
    if found is None:
        raise RuntimeError(f"{run / 'stdout.log'} has no {TASKS[task]['score']}: did that run finish?")
    if wall is None:
        wall = float(re.search(r"wall time: ([0-9.]+) s", text)[1])
    return {"minutes": seconds / 60, "wall_min": wall / 60, "test": float(found["score"]),
            "test_images": int(found["n"]), **read_metrics(run, TASKS[task]["val"])}


def run_budget(root: Path, seconds: float, out: Path, extra: list[str], task: str = "classification") -> dict:
    run = out / f"budget_{seconds / 60:g}min"
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / TASKS[task]["config"]),
           "--data.root", str(root), "--trainer.max_time", max_time(seconds),
           "--trainer.default_root_dir", str(run), *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    (run / "stdout.log").parent.mkdir(parents=True, exist_ok=True)
    (run / "stdout.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or TASKS[task]["result"].search(proc.stdout) is None:
        raise RuntimeError(f"budget {seconds / 60:g} min: train.py exited {proc.returncode} without a "
                           f"{TASKS[task]['score']}; its output is in {run / 'stdout.log'}:\n"
                           f"{(proc.stdout + proc.stderr)[-2000:]}")
    return read_run(run, seconds, wall, task)


def plot(rows: list[dict], path: Path, data: str, task: str = "classification") -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["minutes"] for r in rows], [100 * r["test"] for r in rows], "o-", label="small_data.yaml")
    for r in rows:
        ax.annotate(f"{100 * r['test']:.1f}", (r["minutes"], 100 * r["test"]), textcoords="offset points",
                    xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_xticks([r["minutes"] for r in rows], [f"{r['minutes']:g}" for r in rows])
    ax.set_xticks([], minor=True)
    ax.set_xlabel("time budget (minutes, log scale)")
    ax.set_ylabel(f"{TASKS[task]['score']} (%)")
    ax.set_title(f"{TASKS[task]['config']} from scratch on {Path(data).name}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="classification")
    parser.add_argument("--minutes", type=float, nargs="+", default=None,
                        help="budgets (default: 5 10 20 60; detection and segmentation 5 10 15)")
    parser.add_argument("--root", type=Path, help="the data folder (default: cifar10_small; for detection a "
                                                  "shapes set written in COCO layout, for segmentation as a "
                                                  "mask folder)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "small_data_benchmark")
    parser.add_argument("--tiny", action="store_true", help="20-second budgets, tiny model, synthetic images")
    parser.add_argument("--collect", action="store_true",
                        help="train nothing: the table and curve of the runs already under --out")
    args, extra = parser.parse_known_args(argv)  # anything else goes to train.py (e.g. --model.backbone.embed_dim 128)
    if args.minutes is None:
        args.minutes = [5, 10, 20, 60] if args.task == "classification" else [5, 10, 15]
    if args.tiny:
        args.minutes, extra = [1 / 3], TINY + extra
    args.out.mkdir(parents=True, exist_ok=True)
    if args.collect:
        runs = {float(m[1]): run for run in args.out.glob("budget_*min")
                if (m := re.fullmatch(r"budget_(.+)min", run.name))}
        rows = [read_run(runs[m], m * 60, task=args.task) for m in sorted(runs) if (runs[m] / "stdout.log").is_file()]
        configs = sorted(args.out.glob("budget_*min/*/*/config.yaml"))
        root = yaml.safe_load(configs[0].read_text())["data"]["root"] if configs else str(args.out)
        return report(rows, args, extra, root)
    with tempfile.TemporaryDirectory() as tmp:
        shapes = {"detection": shapes_coco, "segmentation": shapes_masks}.get(args.task)
        if args.root is None and not args.tiny and shapes is None and not CIFAR.is_file():
            parser.error(f"no --root given and {CIFAR} not found")
        if args.root is not None:
            root = args.root
        elif shapes is not None:
            root = shapes(Path(tmp), tiny=args.tiny)
        else:
            root = image_folder(Path(tmp), tiny=True) if args.tiny else cifar10_small(Path(tmp))
        rows = []
        for minutes in args.minutes:
            rows.append(run_budget(root, minutes * 60, args.out, extra, args.task))
            print(f"budget {minutes:g} min: {TASKS[args.task]['score']} {rows[-1]['test']:.4f}", flush=True)
    name = str(root) if args.root else root.name if shapes is not None else "synthetic" if args.tiny \
        else "cifar10_small"
    return report(rows, args, extra, name)


def report(rows: list[dict], args, extra: list[str], data: str) -> list[dict]:
    if not rows:
        raise SystemExit(f"no finished runs under {args.out}")
    names = TASKS[args.task]
    print(f"\ndata: {data}; recipe: {names['config']}; extra arguments: {' '.join(extra) or 'none'}")
    print(f"| budget (min) | epochs | wall (min) | best {names['val']} | {names['score']} |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['minutes']:g} | {r['epochs']} | {r['wall_min']:.1f} | {100 * r['best_val']:.1f} % | "
              f"{100 * r['test']:.1f} % |")
    with open(args.out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    png = plot(rows, args.out / "accuracy_vs_minutes.png", data, args.task)
    print(f"wrote {args.out / 'results.csv'}" + (f" and {png}" if png else " (no matplotlib: no curve)"))
    return rows


if __name__ == "__main__":
    main()
