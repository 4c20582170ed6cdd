"""The ``vit`` command: one subcommand per job, each a thin module here (parse arguments, call the API, print
one line per result). ``python -m vit <job>`` is the same for environments without the script on PATH.

    vit --help            the jobs, one line each
    vit <job> --help      a job's options

Every job returns its exit code: 0 done, 2 a bad argument, file or checkpoint (one line on stderr), 1 a check
that failed (an export or backend whose answers differ from PyTorch's).
"""
from __future__ import annotations

import importlib
import sys

# name -> (module under vit.commands, what it does); `vit --help` prints them in this order
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "train, validate or test with a recipe (the same as python train.py ...)"),
    "predict": ("predict", "top-k classes for a few images, or boxes with a detection checkpoint"),
    "embed": ("embed", "embeddings of images by a frozen backbone, to a .safetensors file"),
    "probe": ("probe", "how good a backbone's frozen features are: kNN and linear probe accuracy"),
    "search": ("search", "the nearest images of an embedded folder to a query image"),
    "convert": ("convert", "a checkpoint from any supported source to another layout"),
    "export": ("export", "a checkpoint to ONNX (fp32 or int8) or torch.export, checked against PyTorch"),
    "visualize": ("visualize", "where the model looks: attention overlaid on an image"),
    "shards": ("shards", "an image folder as litdata shards, for data.dataset: streaming"),
}
COMMANDS["zeroshot"] = ("zeroshot", "classify images by class names alone, with a CLIP / SigLIP checkpoint")
COMMANDS["wise"] = ("wise", "WiSE-FT: the zero-shot and fine-tuned classifiers' weights interpolated")


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: vit <command> [options]   (vit <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items()]
    return "\n".join(lines)


def main(args: list[str] | None = None) -> int:
    """``vit <command> ...``: run one job and return its exit code.

    Example:
        >>> main(["--help"])  # doctest: +ELLIPSIS
        usage: vit <command> [options]   (vit <command> --help for its options)
        ...
          predict    top-k classes for a few images, or boxes with a detection checkpoint
        ...
        0
    """
    args = list(sys.argv[1:] if args is None else args)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"vit: error: unknown command {name!r}; expected one of: {', '.join(COMMANDS)} (see vit --help)",
              file=sys.stderr)
        return 2
    module = importlib.import_module(f"{__name__}.{COMMANDS[name][0]}")
    code = module.main(rest)
    return code if isinstance(code, int) else 0
