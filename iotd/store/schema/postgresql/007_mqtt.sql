-- iotd schema 7: MQTT ingest -- what was committed for a broker message, so a redelivery is not stored twice.
-- Valid SQL on SQLite and PostgreSQL.
-- key: 'm/<client id>/<message id>' (the broker's QoS 1 message id: at most 65,535 per client id)
-- or 'i/<tenant>/<device>/<id>' (the id a device put in its payload); digest: of topic and payload.
CREATE TABLE mqtt_seen (
    key      TEXT PRIMARY KEY,
    digest   TEXT NOT NULL,
    seen_us  BIGINT NOT NULL
);
CREATE INDEX mqtt_seen_by_time ON mqtt_seen (seen_us);
