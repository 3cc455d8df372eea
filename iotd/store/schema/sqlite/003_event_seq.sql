-- iotd schema 3: event ids and stamps come from one counter row, updated in the inserting
-- transaction, so they are allocated in commit order with no holes (see iotd/store/events.py).
CREATE TABLE event_seq (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    last_id INTEGER NOT NULL,            -- the last event id handed out (never reused, even after a prune)
    last_us INTEGER NOT NULL             -- the last inserted_us handed out (stamps never go backwards)
);
INSERT INTO event_seq (id, last_id, last_us)
    SELECT 1, max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0), coalesce(max(id), 0)),
           coalesce(max(inserted_us), 0)
    FROM events;
