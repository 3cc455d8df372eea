-- iotd schema 6: push at fleet scale -- command expiry, bulk batches, results kept verbatim.
-- Valid SQL on SQLite and PostgreSQL.
-- When a queued command expires (micros); NULL = never.
ALTER TABLE commands ADD COLUMN expires_us BIGINT;
-- The bulk request that queued it (command_batches.id); NULL = queued alone.
ALTER TABLE commands ADD COLUMN batch BIGINT;
-- Every /result body as it came: UTF-8 text, or base64 when result_encoding = 'base64'.
ALTER TABLE commands ADD COLUMN result_raw TEXT;
ALTER TABLE commands ADD COLUMN result_encoding TEXT;
-- JSON text of the extra fields of an error result ({"error": ..., "code": 1} -> {"code": 1}).
ALTER TABLE commands ADD COLUMN error_detail TEXT;
-- The firmware's uuid query value of the last send and of the result.
ALTER TABLE commands ADD COLUMN sent_uuid TEXT;
ALTER TABLE commands ADD COLUMN result_uuid TEXT;
-- The expiry sweep: queued commands that have a deadline.
CREATE INDEX commands_expiry ON commands (expires_us) WHERE status = 'queued' AND expires_us IS NOT NULL;
-- A batch's commands.
CREATE INDEX commands_by_batch ON commands (batch, id) WHERE batch IS NOT NULL;
CREATE TABLE command_batches (
    id          BIGINT PRIMARY KEY,
    tenant      TEXT NOT NULL,
    created_us  BIGINT NOT NULL,
    total       INTEGER NOT NULL
);
