-- iotd schema 5: several nodes on one store.  Valid SQL on SQLite and PostgreSQL.
-- The channel prefix on the bus is this store's cluster id, so clusters sharing one Redis never meet.
-- The nodes that use this store, each with its heartbeat (a node whose heartbeat is old is dead).
CREATE TABLE nodes (
    name       TEXT PRIMARY KEY,
    started_us BIGINT NOT NULL,
    seen_us    BIGINT NOT NULL,          -- the last heartbeat
    bus        INTEGER NOT NULL,         -- 1: the node has a bus (0: in-process only)
    doc        TEXT NOT NULL             -- JSON: what other nodes may show of it (public_host, version)
);
-- Every node's device links, so that any node lists them all (the sockets live on their node).
CREATE TABLE links (
    id         TEXT PRIMARY KEY,
    node       TEXT NOT NULL,
    tenant     TEXT NOT NULL,
    created_us BIGINT NOT NULL,
    doc        TEXT NOT NULL             -- JSON: the link as GET /api/v1/devicelink shows it
);
CREATE INDEX links_by_tenant ON links (tenant, id);
CREATE INDEX links_by_node ON links (node);
INSERT INTO meta (name, value) VALUES ('cluster_id', lower(hex(randomblob(16))));
INSERT INTO meta (name, value) VALUES ('registry_revision', '0');
-- Which push devices are online, cluster-wide: a transition is one checked update (one conn event),
-- seen_us is each node's latest poll, flushed every second; the leader's sweep marks the silent offline.
CREATE TABLE presence (
    tenant  TEXT NOT NULL,
    device  TEXT NOT NULL,
    online  INTEGER NOT NULL,
    seen_us BIGINT NOT NULL,
    PRIMARY KEY (tenant, device)
);
CREATE INDEX presence_silent ON presence (online, seen_us);
