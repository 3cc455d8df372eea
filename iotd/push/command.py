"""One command as the service, the REST API and the device see it (built from a stored row)."""

from __future__ import annotations

import json
from typing import Any

from iotd.push.state import FINISHED, Status
from iotd.timefmt import iso


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class Command:
    """A snapshot of one stored command.  The store holds the truth; nothing keeps these for long."""

    __slots__ = ("id", "tenant", "device", "status", "verb", "endpoint", "body", "has_body",
                 "content_type", "query_string", "attempts", "created_us", "sent_us",
                 "finished_us", "response_raw", "response", "parsed", "error", "expires_us", "batch",
                 "result_raw", "result_encoding", "error_detail", "sent_uuid", "result_uuid", "_payload")

    def __init__(self, id: int, tenant: str, device: str, status: str, endpoint: str,
                 verb: str | None = None, body: Any = None, has_body: bool = False,
                 content_type: str | None = None, query_string: str | None = None,
                 attempts: int = 0, created_us: int = 0, sent_us: int | None = None,
                 finished_us: int | None = None, response_raw: str | None = None,
                 response: Any = None, parsed: bool = False, error: str | None = None,
                 expires_us: int | None = None, batch: int | None = None, result_raw: str | None = None,
                 result_encoding: str | None = None, error_detail: Any = None, sent_uuid: str | None = None,
                 result_uuid: str | None = None):
        self.id = id
        self.tenant = tenant
        self.device = device
        self.status = Status(status).value
        self.verb = verb
        self.endpoint = endpoint
        self.body = body
        self.has_body = has_body
        self.content_type = content_type
        self.query_string = query_string
        self.attempts = attempts
        self.created_us = created_us
        self.sent_us = sent_us
        self.finished_us = finished_us
        self.response_raw = response_raw
        self.response = response
        self.parsed = parsed
        self.error = error
        self.expires_us = expires_us
        self.batch = batch
        self.result_raw = result_raw  # the /result body as it came (base64 when result_encoding says so)
        self.result_encoding = result_encoding
        self.error_detail = error_detail  # the extra fields of an error result (a dict), or None
        self.sent_uuid = sent_uuid
        self.result_uuid = result_uuid
        self._payload: bytes | None = None

    @classmethod
    def from_row(cls, row: tuple) -> "Command":
        """From a row in :data:`iotd.store.commands.COLUMNS` order."""
        (cid, tenant, device, status, verb, endpoint, body, ctype, qs, attempts,
         created_us, sent_us, finished_us, response_raw, response, error, expires_us, batch, result_raw,
         result_encoding, error_detail, sent_uuid, result_uuid) = row
        return cls(id=cid, tenant=tenant, device=device, status=status, endpoint=endpoint, verb=verb,
                   body=json.loads(body) if body is not None else None, has_body=body is not None,
                   content_type=ctype, query_string=qs, attempts=attempts, created_us=created_us,
                   sent_us=sent_us, finished_us=finished_us, response_raw=response_raw,
                   response=json.loads(response) if response is not None else None,
                   parsed=response is not None, error=error, expires_us=expires_us, batch=batch,
                   result_raw=result_raw, result_encoding=result_encoding,
                   error_detail=json.loads(error_detail) if error_detail is not None else None,
                   sent_uuid=sent_uuid, result_uuid=result_uuid)

    @property
    def key(self) -> tuple[str, str]:
        return self.tenant, self.device

    @property
    def finished(self) -> bool:
        return Status(self.status) in FINISHED

    @property
    def shown_response(self) -> Any:
        """The response as the API shows it: parsed when it parsed, else as sent."""
        if self.parsed:
            return self.response
        return self.response_raw

    @property
    def sent_at(self) -> float | None:
        """When it was last sent, in clock seconds."""
        return self.sent_us / 1_000_000 if self.sent_us is not None else None

    def spec(self) -> dict[str, Any]:
        """The fields the operator gave (and only those)."""
        out: dict[str, Any] = {}
        if self.verb is not None:
            out["verb"] = self.verb
        out["endpoint"] = self.endpoint
        if self.has_body:
            out["body"] = self.body
        if self.content_type is not None:
            out["contentType"] = self.content_type
        if self.query_string is not None:
            out["queryString"] = self.query_string
        return out

    def payload(self) -> bytes:
        """The ``/push`` answer: the operator's fields, serialized once."""
        if self._payload is None:
            self._payload = dumps(self.spec()).encode("utf-8")
        return self._payload

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "device": self.device, "status": self.status}
        out.update(self.spec())
        out["attempts"] = self.attempts
        out["createdAt"] = iso(self.created_us)
        out["sentAt"] = iso(self.sent_us) if self.sent_us is not None else None
        out["finishedAt"] = iso(self.finished_us) if self.finished_us is not None else None
        out["response"] = self.shown_response if self.status == "done" else None
        if self.response_raw is not None:
            out["responseRaw"] = self.response_raw
        out["error"] = self.error
        out["expiresAt"] = iso(self.expires_us) if self.expires_us is not None else None
        if self.batch is not None:
            out["batch"] = self.batch
        if self.result_raw is not None:
            out["resultRaw"] = self.result_raw
            if self.result_encoding is not None:
                out["resultEncoding"] = self.result_encoding
        if self.error_detail is not None:
            out["errorDetail"] = self.error_detail
        if self.sent_uuid is not None:
            out["sentUuid"] = self.sent_uuid
        if self.result_uuid is not None:
            out["resultUuid"] = self.result_uuid
        return out

    # -- the action events of its transitions -------------------------------------------

    def send_event(self) -> tuple[str, str, str, dict[str, Any]]:
        """The event-log item of a send (``reqType: "req"``)."""
        return (self.tenant, "action", self.device, {
            "dir": "down", "reqType": "req", "actionID": self.endpoint,
            "params": self.body if self.has_body else None, "code": 200, "msg": "",
            "msgToken": str(self.id)})

    def finish_event(self) -> tuple[str, str, str, dict[str, Any]]:
        """The event-log item of a finish (``reqType: "resp"``: 200 with the response, 408 expired, or 500)."""
        done = self.status == "done"
        expired = self.status == "expired"
        event = {
            "dir": "down", "reqType": "resp", "actionID": self.endpoint,
            "params": self.body if self.has_body else None,
            "code": 200 if done else 408 if expired else 500, "msg": "expired" if expired else self.error or "",
            "msgToken": str(self.id),
            "response": self.shown_response if done else None}
        if self.error_detail is not None:
            event["errorDetail"] = self.error_detail
        # (resultRaw is not repeated here: the event has the response or the error, and
        # the body, up to max_body_bytes, stays in the command -- GET /api/v1/commands/{id})
        return (self.tenant, "action", self.device, event)
