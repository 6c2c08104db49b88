"""Reaching the Hugging Face Hub, or knowing quickly that it cannot be reached."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

PROBE_TIMEOUT_SECONDS = 3.0


def offline() -> bool:
    """True when the Hub is off limits, either by HF_HUB_OFFLINE or because it does not answer.

    Without this probe an unreachable Hub costs a minute of retries per file before failing.
    When it does not answer, the process switches to offline mode, so models and datasets already
    in the Hub cache still load.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return False  # a direct probe says nothing about a proxied connection
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=PROBE_TIMEOUT_SECONDS).close()
        return False
    except OSError:
        _switch_offline()
        return True


def _switch_offline() -> None:
    import datasets.config
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
    datasets.config.HF_DATASETS_OFFLINE = True
