-- Triggers: cron and event triggers that create executions of a service's function.

CREATE TABLE triggers (
    id            text PRIMARY KEY,
    project_id    text NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    name          text NOT NULL,
    type          text NOT NULL CHECK (type IN ('cron', 'event')),
    active        boolean NOT NULL DEFAULT true,
    input         jsonb NOT NULL DEFAULT '{}',
    -- A tagged union ({"type": "function", "service", "function"}; pipelines later).
    operation     jsonb NOT NULL,
    -- The service a function operation targets, as a column: list filter, pause check, cascade.
    service_id    text REFERENCES services (id) ON DELETE CASCADE,
    spec          jsonb NOT NULL,
    -- Cron only: the next tick to fire; NULL once end_at has passed (or for event triggers).
    next_fire_at  timestamptz,
    last_fired_at timestamptz,
    status        text NOT NULL DEFAULT 'ok' CHECK (status IN ('ok', 'skipped', 'error', 'finished')),
    last_error    text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX triggers_project_name ON triggers (project_id, name);
CREATE INDEX triggers_project_created ON triggers (project_id, created_at, id);
CREATE INDEX triggers_service ON triggers (service_id);
-- What every scheduler polls: due cron triggers, earliest first.
CREATE INDEX triggers_due ON triggers (next_fire_at)
    WHERE active AND type = 'cron' AND next_fire_at IS NOT NULL;
-- What the event consumer looks up per event.
CREATE INDEX triggers_event_resource ON triggers (project_id, (spec ->> 'resource'))
    WHERE active AND type = 'event';

-- Event triggers in mode "once": at most one firing per (trigger, resource id).
CREATE TABLE trigger_firings (
    trigger_id   text NOT NULL REFERENCES triggers (id) ON DELETE CASCADE,
    resource_id  text NOT NULL,
    event_id     text NOT NULL,
    execution_id text,
    fired_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (trigger_id, resource_id)
);
