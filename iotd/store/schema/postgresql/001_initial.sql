-- iotd schema 1 (PostgreSQL): keys, registry, streams, the event log.
CREATE TABLE meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
INSERT INTO meta (name, value) VALUES ('keys_revision', '0');

CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY,
    tenant       TEXT NOT NULL,
    name         TEXT NOT NULL,
    role         TEXT NOT NULL,
    groups       TEXT NOT NULL,          -- JSON array
    permissions  TEXT NOT NULL,          -- JSON array of "resource:action"
    key_hash     TEXT NOT NULL UNIQUE,   -- sha256 hex of the key; the key itself is never stored
    created_at   BIGINT NOT NULL,        -- micros
    expires_at   BIGINT,
    last_used_at BIGINT
);

CREATE TABLE devices (
    tenant     TEXT NOT NULL,
    identifier TEXT NOT NULL,            -- upper case
    push_id    BIGINT UNIQUE,
    doc        TEXT NOT NULL,            -- JSON: the registry fields
    PRIMARY KEY (tenant, identifier)
);

CREATE TABLE streams (
    tenant TEXT NOT NULL,
    id     TEXT NOT NULL,
    doc    TEXT NOT NULL,                -- JSON: {"devices": [...], "tags": [...]}
    PRIMARY KEY (tenant, id)
);

CREATE TABLE events (
    id          BIGINT PRIMARY KEY,      -- allocated from event_seq (schema 3), in commit order
    tenant      TEXT NOT NULL,
    kind        TEXT NOT NULL,           -- packet | reading | ota | action | conn
    device      TEXT NOT NULL,
    inserted_us BIGINT NOT NULL UNIQUE,  -- strictly increases with id
    data        TEXT NOT NULL            -- JSON body without id / inserted_at
);
CREATE INDEX events_by_kind ON events (tenant, kind, id);
CREATE INDEX events_by_device ON events (tenant, device, kind, id);
CREATE INDEX events_by_time ON events (inserted_us);
