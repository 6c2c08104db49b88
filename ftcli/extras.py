"""Optional features and the extra that installs each: a missing package is a user error that says what to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from ftcli.errors import FtcliError


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import `module`, or explain that `feature` needs `pip install 'ftcli[extra]'`."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise FtcliError(
            f"{feature} needs the {package} package, which is not installed", f"pip install 'ftcli[{extra}]'"
        ) from None
