-- iotd schema 2: the push command queue.
CREATE TABLE commands (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant        TEXT NOT NULL,
    device        TEXT NOT NULL,         -- device identifier (upper case)
    status        TEXT NOT NULL,         -- queued | sent | done | failed | cancelled
    verb          TEXT,                  -- GET | POST; NULL = left out (device default POST)
    endpoint      TEXT NOT NULL,
    body          TEXT,                  -- JSON text of the body; NULL = left out
    content_type  TEXT,
    query_string  TEXT,
    attempts      INTEGER NOT NULL DEFAULT 0,
    created_us    INTEGER NOT NULL,      -- micros
    sent_us       INTEGER,               -- last send
    finished_us   INTEGER,
    response_raw  TEXT,                  -- the result's response as sent (a string as is, else its JSON)
    response      TEXT,                  -- JSON text of the parsed response; NULL when it did not parse
    error         TEXT
);
CREATE INDEX commands_by_device ON commands (tenant, device, status, id);
CREATE INDEX commands_by_status ON commands (status, id);
