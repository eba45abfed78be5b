-- The transactional outbox: an event row is written in the same transaction as the change it
-- announces; the relay publishes it (Nats-Msg-Id = event_id) and deletes it once JetStream acks.
CREATE TABLE outbox (
    seq        bigserial PRIMARY KEY,
    event_id   text NOT NULL UNIQUE,
    event_name text NOT NULL,
    subject    text NOT NULL,
    stream     text,
    payload    bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
