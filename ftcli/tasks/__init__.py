"""The kinds of task ftcli trains, one module each, and the registry the rest of ftcli asks:

    single_label   one class per example (softmax, cross-entropy)
    multi_label    any number of labels per example, each yes or no (sigmoid per label, binary cross-entropy)
    regression     one number per example (the raw output, mean squared error or Huber)

A task is a `Task` (tasks/base.py): everything that differs by task lives in its module. Importing
this package imports no torch: a task's objective imports it when built.
"""

from __future__ import annotations

from typing import Any

from ftcli.tasks.base import REGISTRY, Decider, MetricSpec, Objective, Task
from ftcli.tasks.multi_label import MultiLabel
from ftcli.tasks.regression import Regression
from ftcli.tasks.single_label import SingleLabel

REGISTRY.update({task.name: task for task in (SingleLabel(), MultiLabel(), Regression())})
TASKS = tuple(REGISTRY)  # the names config.task accepts
DEFAULT = TASKS[0]

# Every built-in metric, with the tasks it fits, in the config reference's order.
METRICS: dict[str, MetricSpec] = {}
for _task in REGISTRY.values():
    for _name, _spec in _task.metrics.items():
        METRICS.setdefault(_name, _spec)


def get(name: str) -> Task:
    """The task named `name` (config.task)."""
    return REGISTRY[name]


def described() -> str:
    """Every task with what it predicts, for the config reference."""
    named = [f"{task.name} ({task.about})" for task in REGISTRY.values()]
    return ", ".join(named[:-1]) + " or " + named[-1]


def option_problems(name: str, config: Any) -> list[str]:
    """The options set in `config` that its task would ignore, each named with the fix."""
    task = get(name)
    return task.problems(config, [other for other in REGISTRY.values() if other is not task])


def prediction_fields(decider: Any, names: list[str], scores: Any) -> dict[str, Any]:
    """What one example's prediction reads as (`ftcli predict` and the server), by the decider's task."""
    return get(decider.task).prediction_fields(decider, names, scores)


__all__ = ["DEFAULT", "METRICS", "REGISTRY", "TASKS", "Decider", "described", "MetricSpec", "Objective", "Task", "get", "option_problems", "prediction_fields"]
