"""The web console: the static files of :mod:`iotd.console` at ``/console/``; ``/`` redirects there.

The console is a page of plain ES modules that talks only to iotd's public
REST API and websockets (the browser holds the key); this module only
serves its files.  They are read once, when the site is built, into memory:
a request never touches the file system, and only the names shipped are
served (anything else under ``/console/`` is the usual JSON 404).

Every answer carries the spec's headers: the Content-Security-Policy (no
inline script, connections only to this origin and websockets),
``X-Content-Type-Options: nosniff`` and ``Referrer-Policy: no-referrer``.
Files are served with a strong ``ETag`` (a hash of the content) and
``Cache-Control: no-cache``: a browser revalidates and gets a 304 until a
new iotd ships a changed file.

Chosen where the spec is silent: ``/console`` redirects to ``/console/``
(301) and ``/`` to ``/console/`` (302, so turning the console off later is
not remembered by browsers); methods other than GET and HEAD are 405;
``X-Frame-Options: DENY`` keeps the page out of other sites' frames.  With
``[http] console = false`` none of this is mounted: ``/`` and
``/console/`` are 404 as any unknown path.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Any

from iotd import errors
from iotd.request import respond

PREFIX = b"/console/"
CSP = b"default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:"
HEADERS = {
    b"content-security-policy": CSP,
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
    b"x-frame-options": b"DENY",
}
TYPES = {
    "html": b"text/html; charset=utf-8",
    "js": b"text/javascript; charset=utf-8",
    "css": b"text/css; charset=utf-8",
    "svg": b"image/svg+xml",
    "png": b"image/png",
    "ico": b"image/x-icon",
    "txt": b"text/plain; charset=utf-8",
}


class Asset:
    __slots__ = ("body", "content_type", "etag")

    def __init__(self, body: bytes, content_type: bytes):
        self.body = body
        self.content_type = content_type
        self.etag = b'"' + hashlib.sha256(body).hexdigest()[:32].encode() + b'"'


def shipped_files() -> dict[str, bytes]:
    """``{relative name: content}`` of every servable file of the :mod:`iotd.console` package."""
    out: dict[str, bytes] = {}

    def walk(folder: Any, prefix: str) -> None:
        for entry in folder.iterdir():
            name = prefix + entry.name
            if entry.is_dir():
                if not entry.name.startswith((".", "__")):
                    walk(entry, name + "/")
            elif entry.name.rpartition(".")[2] in TYPES:
                out[name] = entry.read_bytes()

    walk(resources.files("iotd.console"), "")
    return out


class Console:
    """Answers ``/``, ``/console`` and everything under ``/console/`` (see :meth:`claims`)."""

    def __init__(self, files: dict[str, bytes] | None = None):
        files = shipped_files() if files is None else files
        self._assets = {name.encode(): Asset(body, TYPES[name.rpartition(".")[2]])
                        for name, body in files.items()}

    @staticmethod
    def claims(path: bytes) -> bool:
        return path in (b"/", b"/console") or path.startswith(PREFIX)

    def render(self, request: Any) -> bytes:
        for name, value in HEADERS.items():
            request.setHeader(name, value)
        if request.method not in (b"GET", b"HEAD"):
            return respond(request, 405, errors.MethodNotAllowed(
                f"method {request.method.decode('latin-1')[:20]} not allowed here").to_json())
        path = request.path
        if path in (b"/", b"/console"):
            request.setResponseCode(302 if path == b"/" else 301)
            request.setHeader(b"location", PREFIX)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"see /console/\n"
        asset = self._assets.get(path[len(PREFIX):] or b"index.html")
        if asset is None:
            return respond(request, 404, errors.NotFound(
                f"no such path {path.decode('latin-1')[:200]}").to_json())
        request.setHeader(b"etag", asset.etag)
        request.setHeader(b"cache-control", b"no-cache")
        if asset.etag in _tags(request.getHeader(b"if-none-match")):
            request.setResponseCode(304)
            return b""
        request.setHeader(b"content-type", asset.content_type)
        return asset.body


def _tags(value: bytes | None) -> list[bytes]:
    """The entity tags of an ``If-None-Match`` header (weak ones compare by their value)."""
    if not value:
        return []
    return [tag.strip().removeprefix(b"W/") for tag in value.split(b",")]
