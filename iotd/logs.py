"""Logging: ``twisted.logger`` with the level from ``[iotd] log_level``.

iotd's own loggers publish through one filtering observer, so the level
applies to everything iotd says (Twisted's own messages pass unfiltered).
Use ``log = Logger()`` as a class attribute, with named fields in PEP 3101
format strings.  Never put a key or token in a log line.
"""

from __future__ import annotations

import sys

from twisted import logger as _tl

_LEVELS = {
    "debug": _tl.LogLevel.debug,
    "info": _tl.LogLevel.info,
    "warn": _tl.LogLevel.warn,
    "error": _tl.LogLevel.error,
}

_predicate = _tl.LogLevelFilterPredicate(defaultLogLevel=_tl.LogLevel.info)
_observer = _tl.FilteringLogObserver(_tl.globalLogPublisher, [_predicate])


def set_level(name: str) -> None:
    _predicate.setLogLevelForNamespace(None, _LEVELS[name])


class Logger(_tl.Logger):
    """A ``twisted.logger.Logger`` that honours the configured level."""

    def __init__(self, namespace=None, source=None, observer=None):
        if namespace is None:
            namespace = sys._getframe(1).f_globals.get("__name__", "iotd")
        super().__init__(namespace, source, observer if observer is not None else _observer)
