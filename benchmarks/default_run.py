"""The default run, repeated over seeds: ``python train.py`` (the digits recipe: fit, then test the best
checkpoint) once per seed, each in a fresh process, one after the other.

    python benchmarks/default_run.py --seeds 0 1 2            # the figure in the README (about 3-4 minutes)
    python benchmarks/default_run.py --seeds 0 --model.ema_decay 0.999   # anything else goes to train.py

Prints a table (seed, test accuracy, wall time of train.py as it reports it) and the mean and spread (min-max),
and this machine's fp32 matmul rate measured just before (2048^2, 2 threads): the same VM kind has run 1.4x apart
between days, so a wall time means something only next to that rate. Nothing else should run on the machine
meanwhile if the wall times are to mean anything.
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from inference import matmul_peaks  # noqa: E402
RESULT = re.compile(r"test accuracy: (?P<acc>[0-9.]+) on (?P<n>\d+) held-out images \| wall time: (?P<wall>[0-9.]+) s")


def run_seed(seed: int, extra: list[str], workdir: Path) -> dict:
    cmd = [sys.executable, str(REPO / "train.py"), "--seed_everything", str(seed), "--trainer.enable_progress_bar",
           "false", "--trainer.default_root_dir", str(workdir / f"seed{seed}"), *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    found = RESULT.search(proc.stdout)
    if proc.returncode != 0 or found is None:
        raise RuntimeError(f"seed {seed}: train.py exited {proc.returncode} without a test accuracy:\n"
                           f"{(proc.stdout + proc.stderr)[-2000:]}")
    return {"seed": seed, "acc": float(found["acc"]), "images": int(found["n"]), "wall_s": float(found["wall"])}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args, extra = parser.parse_known_args(argv)
    peak = matmul_peaks(threads=2, repeats=10)["fp32"]
    print(f"fp32 matmul on this machine: {peak / 1e9:.0f} GFLOP/s (2048^2, 2 threads)", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            rows.append(run_seed(seed, extra, Path(tmp)))
            print(f"seed {seed}: test accuracy {rows[-1]['acc']:.4f} in {rows[-1]['wall_s']:.1f} s", flush=True)
    print(f"\n`python train.py {' '.join(extra)}`".rstrip() + f" over seeds {args.seeds}")
    print("| seed | test accuracy | wall time (s) |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['acc']:.4f} | {r['wall_s']:.1f} |")
    accs, walls = [r["acc"] for r in rows], [r["wall_s"] for r in rows]
    print(f"| mean (min-max) | {statistics.mean(accs):.4f} ({min(accs):.4f}-{max(accs):.4f}) | "
          f"{statistics.mean(walls):.1f} ({min(walls):.1f}-{max(walls):.1f}) |")
    print(f"fp32 matmul before the runs: {peak / 1e9:.0f} GFLOP/s (2048^2, 2 threads)")
    return rows


if __name__ == "__main__":
    main()
