-- Pipelines: graphs of function and merge nodes. A pipeline's graph is versioned; a pipeline
-- execution runs the version it started with.

CREATE TABLE pipelines (
    id                  text PRIMARY KEY,
    project_id          text NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    name                text NOT NULL,
    description         text NOT NULL DEFAULT '',
    version             integer NOT NULL DEFAULT 1,
    installed           boolean NOT NULL DEFAULT false,
    statistics_reset_at timestamptz,
    created_at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at          timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE UNIQUE INDEX pipelines_project_name ON pipelines (project_id, name);
CREATE INDEX pipelines_project_created ON pipelines (project_id, created_at, id);

-- The graph as validated (services resolved to ids, each connection marked fan-out or not).
CREATE TABLE pipeline_versions (
    pipeline_id text NOT NULL REFERENCES pipelines (id) ON DELETE CASCADE,
    version     integer NOT NULL,
    graph       jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (pipeline_id, version)
);
-- Which services a pipeline's versions use: a service in use cannot be deleted under it.
CREATE TABLE pipeline_services (
    pipeline_id text NOT NULL REFERENCES pipelines (id) ON DELETE CASCADE,
    service_id  text NOT NULL,
    PRIMARY KEY (pipeline_id, service_id)
);

CREATE TABLE pipeline_executions (
    id                  text PRIMARY KEY,
    project_id          text NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    pipeline_id         text NOT NULL REFERENCES pipelines (id) ON DELETE CASCADE,
    version             integer NOT NULL,
    status              text NOT NULL DEFAULT 'created'
        CHECK (status IN ('created', 'in-progress', 'success', 'failed', 'terminated')),
    input               jsonb NOT NULL DEFAULT '{}',
    variables           jsonb NOT NULL DEFAULT '{}',
    output              jsonb,
    error               jsonb,
    -- Bumped by each resume: the executions a resume creates are told apart by it.
    round               integer NOT NULL DEFAULT 0,
    terminate_requested boolean NOT NULL DEFAULT false,
    idempotency_key     text,
    trigger_id          text,
    trigger_fire_time   timestamptz,
    event_id            text,
    created_at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    started_at          timestamptz,
    ended_at            timestamptz,
    updated_at          timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX pipeline_executions_project_created ON pipeline_executions (project_id, created_at, id);
CREATE INDEX pipeline_executions_pipeline_created ON pipeline_executions (pipeline_id, created_at, id);
CREATE INDEX pipeline_executions_pipeline_status ON pipeline_executions (pipeline_id, status);
CREATE UNIQUE INDEX pipeline_executions_idempotency ON pipeline_executions (project_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE UNIQUE INDEX pipeline_executions_cron_tick ON pipeline_executions (trigger_id, trigger_fire_time)
    WHERE trigger_id IS NOT NULL AND trigger_fire_time IS NOT NULL;
CREATE UNIQUE INDEX pipeline_executions_event ON pipeline_executions (trigger_id, event_id)
    WHERE trigger_id IS NOT NULL AND event_id IS NOT NULL;

-- Each node's state in one pipeline execution: counters kept as executions are created and
-- end, so advancing never counts a fan-out's executions one by one.
CREATE TABLE pipeline_nodes (
    pipeline_execution_id text NOT NULL REFERENCES pipeline_executions (id) ON DELETE CASCADE,
    node                  text NOT NULL,
    status                text NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'in-progress', 'success', 'failed', 'skipped', 'terminated')),
    created               integer NOT NULL DEFAULT 0,
    live                  integer NOT NULL DEFAULT 0,
    succeeded             integer NOT NULL DEFAULT 0,
    failed                integer NOT NULL DEFAULT 0,
    terminated            integer NOT NULL DEFAULT 0,
    error                 jsonb,
    output                jsonb,  -- a merge node's emitted lists
    -- The resume round from which this node's executions count (its outputs, its sink output).
    since_round           integer NOT NULL DEFAULT 0,
    PRIMARY KEY (pipeline_execution_id, node)
);

-- What reached a merge node: one row per carrying connection per upstream execution.
CREATE TABLE pipeline_merge_items (
    pipeline_execution_id text NOT NULL REFERENCES pipeline_executions (id) ON DELETE CASCADE,
    node                  text NOT NULL,
    port                  text NOT NULL,
    source_execution_id   text NOT NULL,
    path                  integer[] NOT NULL,
    value                 jsonb,
    PRIMARY KEY (pipeline_execution_id, node, port, source_execution_id)
);

-- A node execution knows its place: node, upstream execution, fan-out element, resume round.
ALTER TABLE executions
    ADD COLUMN pipeline_node    text,
    ADD COLUMN pipeline_parent  text,
    ADD COLUMN pipeline_element integer NOT NULL DEFAULT 0,
    ADD COLUMN pipeline_path    integer[],
    ADD COLUMN pipeline_round   integer NOT NULL DEFAULT 0;
-- Exactly once per hop: a replayed hop inserts nothing.
CREATE UNIQUE INDEX executions_pipeline_hop ON executions
    (pipeline_execution_id, pipeline_node, pipeline_round, coalesce(pipeline_parent, ''), pipeline_element)
    WHERE pipeline_execution_id IS NOT NULL;

-- Triggers may start pipelines: the pipeline an operation targets, as a column.
ALTER TABLE triggers ADD COLUMN pipeline_id text REFERENCES pipelines (id) ON DELETE CASCADE;
CREATE INDEX triggers_pipeline ON triggers (pipeline_id);
