-- iotd schema 4: push reads that the store answers as the authority for commands.
-- Valid SQL on SQLite and PostgreSQL.
-- Which devices have unfinished work (rebuilt at start, refreshed every second).
CREATE INDEX commands_unfinished ON commands (status, tenant, device, id) WHERE status IN ('queued', 'sent');
-- The sweep: sent commands by the time of their last send.
CREATE INDEX commands_sent ON commands (sent_us) WHERE status = 'sent';
