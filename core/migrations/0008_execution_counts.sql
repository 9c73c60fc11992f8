-- Executions counted by (project, service, status), kept up to date by the executions table
-- itself, so `GET /executions/counters` reads a few rows instead of counting millions.
--
-- Every change appends to `execution_count_changes` (an INSERT, never an UPDATE of a shared
-- row: transitions of the same service never wait on each other's row locks and cannot
-- deadlock). The scheduler folds the changes into `execution_counts` every reconciler round
-- (core/execution_counts.py: compact); a reader sums both, in one snapshot.
CREATE TABLE execution_counts (
    project_id text NOT NULL,
    service_id text NOT NULL,
    status     text NOT NULL,
    n          bigint NOT NULL,
    PRIMARY KEY (project_id, service_id, status)
);
CREATE INDEX execution_counts_service ON execution_counts (service_id);

CREATE TABLE execution_count_changes (
    project_id text NOT NULL,
    service_id text NOT NULL,
    status     text NOT NULL,
    delta      bigint NOT NULL
);
CREATE INDEX execution_count_changes_scope ON execution_count_changes (project_id, service_id);

-- Inserts and deletes are counted per statement (a batch of 1,000 rows is one change row per
-- service and status); a status change per row, and only when the status changed (a lease
-- renewal or a progress update writes nothing here).
CREATE FUNCTION execution_counts_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO execution_count_changes (project_id, service_id, status, delta)
    SELECT project_id, service_id, status, count(*) FROM added GROUP BY 1, 2, 3;
    RETURN NULL;
END $$;

CREATE FUNCTION execution_counts_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO execution_count_changes (project_id, service_id, status, delta)
    SELECT project_id, service_id, status, -count(*) FROM removed GROUP BY 1, 2, 3;
    RETURN NULL;
END $$;

CREATE FUNCTION execution_counts_moved() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO execution_count_changes (project_id, service_id, status, delta)
    VALUES (OLD.project_id, OLD.service_id, OLD.status, -1),
           (NEW.project_id, NEW.service_id, NEW.status, 1);
    RETURN NULL;
END $$;

CREATE TRIGGER executions_counted_inserted AFTER INSERT ON executions
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION execution_counts_inserted();
CREATE TRIGGER executions_counted_deleted AFTER DELETE ON executions
    REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION execution_counts_deleted();
CREATE TRIGGER executions_counted_moved AFTER UPDATE ON executions
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION execution_counts_moved();

-- A TRUNCATE leaves nothing to count (a DELETE here: the TRUNCATE may name these tables too).
CREATE FUNCTION execution_counts_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM execution_counts;
    DELETE FROM execution_count_changes;
    RETURN NULL;
END $$;
CREATE TRIGGER executions_counted_truncated AFTER TRUNCATE ON executions
    FOR EACH STATEMENT EXECUTE FUNCTION execution_counts_truncated();

-- What an existing database holds already.
INSERT INTO execution_counts (project_id, service_id, status, n)
SELECT project_id, service_id, status, count(*) FROM executions GROUP BY 1, 2, 3;
