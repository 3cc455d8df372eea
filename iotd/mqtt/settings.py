"""The ``[mqtt]`` values :mod:`iotd.config` reads: each parser raises ValueError naming what is wrong.

(Imports nothing of iotd but :mod:`iotd.mqtt.broker`, so the config module may import it.)
"""

from __future__ import annotations

import os

from iotd.mqtt.broker import Broker, parse


def broker(text: str) -> Broker | None:
    return parse(text)


def secret_file(text: str) -> str:
    path = text.strip()
    if not path:
        return path
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise ValueError(f"cannot read {path!r}: {e.strerror}") from None
    if mode & 0o077:
        raise ValueError(f"{path!r} is readable by others (mode {mode & 0o777:o}): chmod 600 it")
    if not os.access(path, os.R_OK):
        raise ValueError(f"cannot read {path!r}")
    return path


def topic_prefix(text: str) -> str:
    prefix = text.strip()
    if not prefix or prefix.startswith("/") or prefix.endswith("/") or any(c in prefix for c in "+#\0"):
        raise ValueError("expected topic levels without wildcards (+, #) or a leading or trailing '/'")
    if prefix.startswith("$"):
        raise ValueError("a topic prefix must not start with '$'")
    return prefix


def qos(text: str) -> int:
    if text.strip() not in ("0", "1"):
        raise ValueError(f"expected 0 or 1, got {text!r}")
    return int(text)
