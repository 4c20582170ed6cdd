"""What every ``vit <job>`` shares."""
from __future__ import annotations

import argparse


def one_line(error: BaseException) -> str:
    r"""An error's message on one line (commands print ``error: <it>`` and exit 2).

    Example:
        >>> one_line(ValueError("bad value\n  expected 3"))
        'bad value; expected 3'
    """
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip()).replace(":; ", ": ")


class CommandParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``vit <job>: error: <what>; see vit <job> --help`` and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")
