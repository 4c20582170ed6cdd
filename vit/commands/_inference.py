"""The options every inference command shares: ``--backend``, ``--precision`` (and the old ``--quantize``)."""
from __future__ import annotations

import argparse

from ..deploy.common import PRECISIONS
from ..deploy.order import DEFAULT_ORDER
from ..deploy.runners import BACKENDS


def add_runner_arguments(parser: argparse.ArgumentParser, calibration: bool = True) -> None:
    """``--backend``, ``--precision``, ``--quantize`` (the old spelling of ``--precision int8``) and, where int8
    needs images to calibrate on, ``--calibration DIR``."""
    default = ", ".join(" ".join(pair) for pair in DEFAULT_ORDER)
    parser.add_argument("--backend", choices=["auto", *BACKENDS], default="auto",
                        help="how to run the model (default auto: the fastest that works here and matches eager "
                             "fp32 on the first images, in the order benchmarks/inference.py --save-order measured "
                             f"on this machine, else {default})")
    parser.add_argument("--precision", choices=["auto", *PRECISIONS], default="auto",
                        help="fp32, bf16 (only where the CPU/GPU runs it natively), int8, or auto (default)")
    parser.add_argument("--quantize", choices=["none", "int8"], default=None,
                        help="the old spelling: --quantize int8 is --precision int8, none is fp32")
    if calibration:
        parser.add_argument("--calibration", default=None, metavar="DIR",
                            help="int8 (openvino): images to calibrate on, a folder or .txt list "
                                 "(default: the first batch)")


def runner_precision(options: argparse.Namespace) -> str:
    """The precision asked for; raises ValueError when ``--quantize`` and ``--precision`` disagree."""
    if options.quantize is None:
        return options.precision
    old = "int8" if options.quantize == "int8" else "fp32"
    if options.precision not in ("auto", old):
        raise ValueError(f"--quantize {options.quantize} and --precision {options.precision} disagree: "
                         f"give --precision only")
    return old
