-- One row naming this Ferry installation: workers label their containers with it, so that
-- cleaning up after a crash never touches another installation's containers on a shared
-- Docker engine.
CREATE TABLE installation (
    id         text PRIMARY KEY DEFAULT gen_random_uuid()::text,
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO installation DEFAULT VALUES;
