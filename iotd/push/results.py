"""What a ``/result`` body means, kept so that no result can break the store, the API or an event.

Results from firmware are stored only as text that is valid Unicode and as
parsed values that are safe JSON (:mod:`iotd.jsonsafe`), so no result can
break the store, ``GET /api/v1/commands/{id}`` or the ``action`` event:

- a ``response`` string is kept as sent (``responseRaw``) and also parsed when
  it parses as *safe* JSON; one that parses to NaN, Infinity, an overflowing
  number or a lone surrogate counts as not parsing (shown as the raw string);
- a ``response`` value that is not a string and not safe JSON (``NaN``,
  ``1e400``, a lone surrogate in a key) likewise: it is kept only as text,
  its JSON serialization (``Infinity`` for ``1e400``);
- text that cannot be stored as UTF-8 (a lone surrogate such as ``\\ud800``
  in the response or the error string) is kept with every lone surrogate
  replaced by U+FFFD, as ``bytes.decode(errors="replace")`` would;
- a body that is not JSON at all (not UTF-8 either) fails the command with
  ``malformed result: not JSON (...)``;
- every body is also kept verbatim (``resultRaw``): as text when it is
  UTF-8, else base64 (``resultEncoding: "base64"``); the extra fields of an
  error result are kept as ``errorDetail``.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

from iotd import jsonsafe
from iotd.push.command import dumps

_SURROGATE = re.compile("[\ud800-\udfff]")  # in a str, a surrogate code point is always a lone one


def _text(value: str) -> str:
    """``value`` as text that UTF-8 can store: every lone surrogate becomes U+FFFD."""
    return _SURROGATE.sub("\ufffd", value)


def _safe(value: Any) -> bool:
    try:
        jsonsafe.check(value)
    except jsonsafe.UnsafeJSON:
        return False
    return True


def outcome(raw: bytes) -> dict[str, Any]:
    """What the finish stores for a ``/result`` body: its meaning and the body itself."""
    out = parse_result(raw)
    out.update(kept(raw))
    return out


def kept(raw: bytes) -> dict[str, Any]:
    """The body as it came, storable: UTF-8 text as is, anything else as base64."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return {"result_raw": base64.b64encode(raw).decode("ascii"), "result_encoding": "base64"}
    if _SURROGATE.search(text):  # (UTF-8 never decodes to one; kept for safety)
        return {"result_raw": base64.b64encode(raw).decode("ascii"), "result_encoding": "base64"}
    return {"result_raw": text, "result_encoding": None}


def parse_result(raw: bytes) -> dict[str, Any]:
    """What a ``/result`` body means, as keyword arguments for the finish.

    ``{"response": ...}`` -> done; a string response is kept as sent and, when
    it parses as safe JSON, also parsed (real firmware sends a JSON-encoded
    string).  ``{"error": ...}`` -> failed.  Anything else -> failed with
    ``malformed result: ...``.  What is kept is always storable (see the
    module docstring).
    """
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:
        return {"status": "failed", "error": _text(f"malformed result: not JSON ({str(e)[:200]})")}
    if not isinstance(body, dict):
        return {"status": "failed", "error": "malformed result: not a JSON object"}
    if body.get("error") is not None:
        error = body["error"]
        extra = {k: v for k, v in body.items() if k != "error"}
        out = {"status": "failed", "error": _text(error if isinstance(error, str) else dumps(error))}
        if extra and _safe(extra):
            out["error_detail"] = extra
        return out
    if "response" not in body:
        return {"status": "failed", "error": "malformed result: neither response nor error"}
    value = body["response"]
    if isinstance(value, str):
        try:
            parsed = jsonsafe.loads(value)
        except (ValueError, RecursionError):  # jsonsafe.UnsafeJSON is a ValueError too
            return {"status": "done", "response_raw": _text(value), "response": None, "parsed": False}
        return {"status": "done", "response_raw": value, "response": parsed, "parsed": True}
    if not _safe(value):
        return {"status": "done", "response_raw": _text(dumps(value)), "response": None, "parsed": False}
    return {"status": "done", "response_raw": dumps(value), "response": value, "parsed": True}
