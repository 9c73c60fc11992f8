-- An admin's execution list with no project or service filter walks these indexes in order
-- instead of sorting the whole table.
CREATE INDEX executions_created ON executions (created_at, id);
CREATE INDEX executions_status_created ON executions (status, created_at, id);
