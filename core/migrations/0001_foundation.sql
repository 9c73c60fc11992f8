-- Ferry's foundation schema: tenancy, packages, services, executions.
-- Ids are opaque text (time-ordered, see core/ids.py); times are timestamptz (UTC).

CREATE TABLE projects (
    id          text PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    description text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE tokens (
    id           text PRIMARY KEY,
    name         text NOT NULL,
    role         text NOT NULL CHECK (role IN ('admin', 'owner', 'developer', 'viewer')),
    project_id   text REFERENCES projects (id) ON DELETE CASCADE,
    secret_hash  bytea NOT NULL UNIQUE,       -- sha256 of the secret; the secret is shown once
    prefix       text NOT NULL,               -- first characters, so a user can tell tokens apart
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    last_used_at timestamptz,
    CHECK ((role = 'admin') = (project_id IS NULL))
);

-- Codebase archives are content-addressed and live in PostgreSQL so that workers on any
-- host can fetch them without a shared filesystem.
CREATE TABLE codebases (
    sha256     text PRIMARY KEY,
    size       bigint NOT NULL,
    format     text NOT NULL,
    data       bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE packages (
    id              text PRIMARY KEY,
    project_id      text NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    name            text NOT NULL,
    latest_revision integer NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (project_id, name)
);

CREATE TABLE package_revisions (
    package_id      text NOT NULL REFERENCES packages (id) ON DELETE CASCADE,
    revision        integer NOT NULL,
    manifest        jsonb NOT NULL,
    codebase_sha256 text NOT NULL REFERENCES codebases (sha256),
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (package_id, revision)
);

CREATE TABLE services (
    id                  text PRIMARY KEY,
    project_id          text NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    name                text NOT NULL,
    package_id          text NOT NULL REFERENCES packages (id),
    package_revision    integer NOT NULL,
    module              text NOT NULL,
    runtime             jsonb NOT NULL,
    execution_timeout_s integer NOT NULL,
    max_attempts        integer NOT NULL,
    on_reset            text NOT NULL CHECK (on_reset IN ('rerun', 'failed')),
    env                 jsonb NOT NULL DEFAULT '{}',
    secrets             jsonb NOT NULL DEFAULT '{}',  -- name -> encrypted value
    init_inputs         jsonb NOT NULL DEFAULT '{}',
    status              text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'paused')),
    -- Bumped by every change that needs new replicas (revision, runtime, env...): replicas of
    -- an older generation drain and stop.
    generation          integer NOT NULL DEFAULT 1,
    desired_replicas    integer NOT NULL DEFAULT 0,
    last_activity_at    timestamptz NOT NULL DEFAULT now(),
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX services_project_name ON services (project_id, name);
CREATE INDEX services_package ON services (package_id);

CREATE TABLE executions (
    id                    text PRIMARY KEY,
    project_id            text NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    service_id            text NOT NULL REFERENCES services (id) ON DELETE CASCADE,
    function              text NOT NULL,
    status                text NOT NULL DEFAULT 'created'
        CHECK (status IN ('created', 'in-progress', 'success', 'failed', 'terminated')),
    reason                text CHECK (reason IN ('exception', 'timeout', 'oom', 'crashed', 'lost',
                                                 'max-attempts', 'system')),
    input                 jsonb NOT NULL DEFAULT '{}',
    output                jsonb,
    error                 jsonb,
    progress_percent      real NOT NULL DEFAULT 0,
    progress_message      text,
    attempt               integer NOT NULL DEFAULT 0,
    max_attempts          integer NOT NULL,
    timeout_s             integer NOT NULL,
    idempotency_key       text,
    trigger_id            text,
    trigger_fire_time     timestamptz,
    event_id              text,
    pipeline_execution_id text,
    rerun_of              text,
    -- The lease: the worker holding an in-progress execution renews lease_until by heartbeat.
    -- NULL while in-progress means "handed back, waiting for a worker to claim it".
    lease_until           timestamptz,
    worker_id             text,
    replica_id            text,
    terminate_requested   boolean NOT NULL DEFAULT false,
    log_lines             integer NOT NULL DEFAULT 0,
    log_bytes             bigint NOT NULL DEFAULT 0,
    status_log            jsonb NOT NULL DEFAULT '[]',
    created_at            timestamptz NOT NULL DEFAULT clock_timestamp(),
    started_at            timestamptz,
    finished_at           timestamptz,
    updated_at            timestamptz NOT NULL DEFAULT clock_timestamp()
);
-- Keyset pagination: every list filter has an index ending in (created_at, id).
CREATE INDEX executions_project_created ON executions (project_id, created_at, id);
CREATE INDEX executions_service_created ON executions (service_id, created_at, id);
CREATE INDEX executions_project_status_created ON executions (project_id, status, created_at, id);
CREATE INDEX executions_service_status ON executions (service_id, status);
CREATE INDEX executions_trigger ON executions (trigger_id, created_at, id) WHERE trigger_id IS NOT NULL;
CREATE INDEX executions_pipeline ON executions (pipeline_execution_id, created_at, id)
    WHERE pipeline_execution_id IS NOT NULL;
-- The reconciler's scans stay small: only live executions are indexed.
CREATE INDEX executions_live ON executions (status, lease_until)
    WHERE status IN ('created', 'in-progress');
CREATE UNIQUE INDEX executions_idempotency ON executions (project_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE UNIQUE INDEX executions_cron_tick ON executions (trigger_id, trigger_fire_time)
    WHERE trigger_fire_time IS NOT NULL;
CREATE UNIQUE INDEX executions_event_firing ON executions (trigger_id, event_id)
    WHERE event_id IS NOT NULL;

-- Every attempt is recorded, including the ones whose worker vanished.
CREATE TABLE execution_attempts (
    execution_id text NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
    attempt      integer NOT NULL,
    worker_id    text,
    replica_id   text,
    status       text NOT NULL,
    reason       text,
    error        jsonb,
    started_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at  timestamptz,
    PRIMARY KEY (execution_id, attempt)
);

CREATE TABLE execution_logs (
    execution_id text NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
    seq          integer NOT NULL,
    at           timestamptz NOT NULL,
    stream       text NOT NULL CHECK (stream IN ('stdout', 'stderr', 'system')),
    text         text NOT NULL,
    PRIMARY KEY (execution_id, seq)
);
CREATE INDEX execution_logs_at ON execution_logs (at);

-- Worker processes announce themselves; a stale heartbeat means the host is gone.
CREATE TABLE workers (
    id           text PRIMARY KEY,
    host         text NOT NULL,
    runtime      text NOT NULL,
    capacity     integer NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE replicas (
    id           text PRIMARY KEY,
    service_id   text NOT NULL REFERENCES services (id) ON DELETE CASCADE,
    worker_id    text NOT NULL,
    host         text NOT NULL,
    generation   integer NOT NULL,
    status       text NOT NULL CHECK (status IN ('starting', 'ready', 'draining', 'stopped', 'failed')),
    running      integer NOT NULL DEFAULT 0,
    message      text,
    cold_start_ms integer,
    started_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    stopped_at   timestamptz
);
CREATE INDEX replicas_service_live ON replicas (service_id) WHERE status IN ('starting', 'ready', 'draining');
CREATE INDEX replicas_worker_live ON replicas (worker_id) WHERE status IN ('starting', 'ready', 'draining');
