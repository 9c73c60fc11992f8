-- The outbox: every event Ferry emits is written here in the transaction that caused it, so
-- a crash between the commit and the Redis publish cannot lose it. Whoever committed
-- publishes its rows at once and deletes them; the scheduler's relay publishes what a crash
-- left behind.
CREATE TABLE outbox (
    id          bigserial PRIMARY KEY,
    type        text NOT NULL,
    project_id  text NOT NULL,
    resource    text NOT NULL,
    resource_id text NOT NULL,
    data        jsonb NOT NULL DEFAULT '{}',
    at          timestamptz NOT NULL DEFAULT clock_timestamp()
);
