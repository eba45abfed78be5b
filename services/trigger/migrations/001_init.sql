-- Registered repositories and every webhook delivery (or request by hand) with its outcome.
CREATE TABLE repositories (
    id          uuid PRIMARY KEY,
    url         text NOT NULL,
    key         text NOT NULL UNIQUE,
    secret      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE deliveries (
    id                 uuid PRIMARY KEY,
    provider           text NOT NULL,
    delivery_id        text NOT NULL,
    repository_id      uuid REFERENCES repositories (id) ON DELETE SET NULL,
    repository         text NOT NULL,
    event              text NOT NULL,
    ref                text NOT NULL DEFAULT '',
    before_sha         text NOT NULL DEFAULT '',
    commit_sha         text NOT NULL DEFAULT '',
    pusher             text NOT NULL DEFAULT '',
    -- The changed files the payload listed, or NULL when it cannot tell (force-push, truncated).
    payload_files      jsonb,
    status             text NOT NULL,
    reason             text NOT NULL DEFAULT '',
    changed_files      jsonb NOT NULL DEFAULT '[]',
    errors             jsonb NOT NULL DEFAULT '[]',
    pipeline_event_id  text,
    attempts           integer NOT NULL DEFAULT 0,
    received_at        timestamptz NOT NULL DEFAULT now(),
    finished_at        timestamptz,
    UNIQUE (provider, delivery_id)
);

CREATE INDEX deliveries_newest ON deliveries (received_at DESC);
CREATE INDEX deliveries_waiting ON deliveries (received_at) WHERE status = 'received';
