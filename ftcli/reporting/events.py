"""Reading a run's events (metrics.jsonl) as curves: the one place that knows its keys."""

from __future__ import annotations

import math
from typing import Any


def series(events: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """(step, value) pairs in step order; a step logged twice (a resumed run) keeps its last value."""
    by_step: dict[int, float] = {}
    for event in events:
        if event.get(key) is not None and "step" in event:
            by_step[int(event["step"])] = float(event[key])
    return sorted(by_step.items())


def eval_metric_names(events: list[dict[str, Any]]) -> list[str]:
    """The evaluation metrics in first-seen order, without the eval_ prefix (loss first)."""
    names: list[str] = []
    for event in events:
        names += [key[5:] for key in event if key.startswith("eval_") and key[5:] not in names]
    return sorted(names, key=lambda name: name != "loss")


def steps_per_epoch(events: list[dict[str, Any]]) -> float | None:
    """From the last event that knows both; None before the first epoch has any progress."""
    for event in reversed(events):
        if event.get("epoch") and event.get("step"):
            return event["step"] / event["epoch"]
    return None


def best_eval_step(events: list[dict[str, Any]]) -> int | None:
    losses = finite(series(events, "eval_loss"))
    return min(losses, key=lambda pair: pair[1])[0] if losses else None


def finite(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The points whose value is a number (a diverged run logs nan and inf)."""
    return [(step, value) for step, value in points if math.isfinite(value)]
