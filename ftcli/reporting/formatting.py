"""Numbers as ftcli shows them, in the terminal, the HTML report and the model card alike."""

from __future__ import annotations

import math
from typing import Any


def format_value(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"
    return str(value)


def format_number(value: float | int | None) -> str:
    return "-" if value is None else format_value(value)


def format_short(value: Any) -> str:
    """A hyperparameter as a table shows it: tiny floats (learning rates) in scientific notation."""
    if value is None:
        return "-"
    if isinstance(value, float) and value != 0 and abs(value) < 1e-3:
        return f"{value:.2e}"
    return format_value(value)


def format_flops(value: float) -> str:
    """A count of floating-point operations with its SI prefix: 323.4 MFLOP, 1.25 TFLOP."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}FLOP"
    return f"{value:.3g} FLOP"
