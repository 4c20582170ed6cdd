"""Value ranges of constructor arguments as jsonargparse types: LightningCLI checks them while parsing and
prints them in ``--help``; ``range_problems`` applies the same types to Python callers, one line per bad value."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jsonargparse.typing import (ClosedUnitInterval, NonNegativeFloat, NonNegativeInt, OpenUnitInterval, PositiveFloat,
                                  PositiveInt, restricted_number_type)

Fraction = restricted_number_type("Fraction", float, [(">=", 0), ("<", 1)])  # [0, 1)
DecayFactor = restricted_number_type("DecayFactor", float, [(">", 0), ("<=", 1)])  # (0, 1]

__all__ = ["ClosedUnitInterval", "DecayFactor", "Fraction", "NonNegativeFloat", "NonNegativeInt",
           "OpenUnitInterval", "PositiveFloat", "PositiveInt", "plain", "range_problems"]

_MEANING = {PositiveFloat: "> 0", NonNegativeFloat: ">= 0", PositiveInt: "a positive integer",
            NonNegativeInt: "an integer >= 0", Fraction: "a value in [0, 1)", DecayFactor: "a value in (0, 1]",
            ClosedUnitInterval: "a probability in [0, 1]", OpenUnitInterval: "a value in (0, 1)"}


def range_problems(section: str, checks: Mapping[str, tuple[type, Any]]) -> list[str]:
    """``section.key: expected ..., got ...`` for every value outside its type's range (``None`` = not set).

    Example:
        >>> range_problems("model", {"lr": (PositiveFloat, -1.0), "label_smoothing": (Fraction, 0.1)})
        ['model.lr: expected > 0, got -1.0']
    """
    problems = []
    for key, (kind, value) in checks.items():
        if value is None:
            continue
        try:
            if isinstance(value, bool):
                raise ValueError(f"{value} is not a number")
            kind(value)
        except (TypeError, ValueError):
            problems.append(f"{section}.{key}: expected {_MEANING[kind]}, got {value!r}")
    return problems


def plain(*values: Any) -> tuple[Any, ...]:
    """The values as plain ``int`` / ``float`` (``None`` kept): the CLI hands over instances of the range types,
    which neither ``hparams.yaml`` nor a ``weights_only`` checkpoint load can hold.

    Example:
        >>> [type(v).__name__ for v in plain(PositiveInt(3), Fraction(0.5), None)]
        ['int', 'float', 'NoneType']
    """
    return tuple(v if v is None or type(v) in (int, float, bool) else
                 int(v) if isinstance(v, int) else float(v) if isinstance(v, float) else v for v in values)
