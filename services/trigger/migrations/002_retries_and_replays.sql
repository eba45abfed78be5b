-- A delivery whose git host was unreachable waits until not_before before it is tried again.
ALTER TABLE deliveries ADD COLUMN not_before timestamptz NOT NULL DEFAULT now();
DROP INDEX deliveries_waiting;
CREATE INDEX deliveries_waiting ON deliveries (not_before) WHERE status = 'received';

-- The signature covers the body, not the delivery-id header: the same signed body sent again
-- under a new delivery id is a replay, answered `duplicate`.
ALTER TABLE deliveries ADD COLUMN body_sha256 text;
CREATE UNIQUE INDEX deliveries_same_body ON deliveries (repository_id, body_sha256)
    WHERE body_sha256 IS NOT NULL;
