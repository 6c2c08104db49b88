"""The backends by name. A new backend is a module with a class that has `check` and `train`
(ftcli.training.job.Backend), its entry here, and its name in config.BACKEND_NAMES."""

from __future__ import annotations

from importlib import import_module

from ftcli.errors import FtcliError
from ftcli.training.job import Backend

# name -> module:class, imported when chosen: each backend brings its own heavy imports.
BACKENDS = {
    "loop": "ftcli.training.loop:LoopBackend",
    "trainer": "ftcli.training.trainer:TrainerBackend",
}


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise FtcliError(f"unknown backend '{name}'", f"use one of: {', '.join(BACKENDS)}")
    module, _, cls = BACKENDS[name].partition(":")
    return getattr(import_module(module), cls)()
