-- Events the relay could never publish (larger than NATS accepts, say): kept for a person to
-- look at instead of blocking every event behind them.
CREATE TABLE outbox_failed (
    event_id   text PRIMARY KEY,
    event_name text NOT NULL,
    subject    text NOT NULL,
    stream     text,
    payload    bytea NOT NULL,
    created_at timestamptz NOT NULL,
    error      text NOT NULL,
    failed_at  timestamptz NOT NULL DEFAULT now()
);
