"""The kinds of task ftcli trains, one module each, and the registry the rest of ftcli asks:

    single_label   one class per example (softmax, cross-entropy)
    multi_label    any number of labels per example, each yes or no (sigmoid per label, binary cross-entropy)
    regression     one number per example (the raw output, mean squared error or Huber)
    token_classification  one tag per word (softmax per token, cross-entropy over each word's first piece)

A task is a `Task` (tasks/base.py): everything that differs by task lives in its module. Importing
this package imports no torch: a task's objective imports it when built.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ftcli.tasks.base import REGISTRY, Decider, MetricSpec, Objective, Task
from ftcli.tasks.multi_label import MultiLabel
from ftcli.tasks.regression import Regression
from ftcli.tasks.single_label import SingleLabel
from ftcli.tasks.token_classification import TokenClassification

REGISTRY.update({task.name: task for task in (SingleLabel(), MultiLabel(), Regression(), TokenClassification())})
TASKS = tuple(REGISTRY)  # the names config.task accepts
DEFAULT = TASKS[0]

# Every built-in metric, with the tasks it fits, in the config reference's order: a name several
# tasks define (f1: single_label's and token_classification's) fits each, described by the first.
METRICS: dict[str, MetricSpec] = {}
for _task in REGISTRY.values():
    for _name, _spec in _task.metrics.items():
        _first = METRICS.setdefault(_name, _spec)
        if _first is not _spec:
            METRICS[_name] = replace(_first, tasks=_first.tasks + _spec.tasks)


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


def require_support(name: str, command: str, instead: str) -> None:
    """Refuse, in one line, a command that has no path for task `name` yet (Task.not_yet)."""
    if command in get(name).not_yet:
        from ftcli.errors import FtcliError

        raise FtcliError(f"ftcli {command} is not supported for task {name} yet", instead)


__all__ = ["DEFAULT", "METRICS", "REGISTRY", "TASKS", "Decider", "described", "MetricSpec", "Objective", "Task", "get", "option_problems", "require_support"]
