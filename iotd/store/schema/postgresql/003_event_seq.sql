-- iotd schema 3 (PostgreSQL): event ids and stamps come from one counter row, updated (and so
-- row-locked) in the inserting transaction: allocated in commit order cluster-wide, no holes.
CREATE TABLE event_seq (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    last_id BIGINT NOT NULL,             -- the last event id handed out
    last_us BIGINT NOT NULL              -- the last inserted_us handed out
);
INSERT INTO event_seq (id, last_id, last_us)
    SELECT 1, coalesce(max(id), 0), coalesce(max(inserted_us), 0) FROM events;
