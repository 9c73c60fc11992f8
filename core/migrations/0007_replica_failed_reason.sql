-- `replica-failed`: the service's replica could not start, after the allowed tries; the
-- executions waiting for it fail with the cause instead of waiting for ever.
ALTER TABLE executions DROP CONSTRAINT executions_reason_check;
ALTER TABLE executions ADD CONSTRAINT executions_reason_check
    CHECK (reason IN ('exception', 'timeout', 'oom', 'crashed', 'lost', 'max-attempts', 'system',
                      'replica-failed'));
