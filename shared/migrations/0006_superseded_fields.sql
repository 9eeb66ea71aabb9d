-- The provided fields a request lost to newer writes (wire names), stored with its outcome: a redelivery or an
-- Idempotency-Key retry answers exactly what the first application answered, supersededFields included.
ALTER TABLE processed_requests ADD COLUMN superseded_fields text[];
