-- Requests that were dead-lettered, for GET /api/external/requests/{id} ("failed" with the reason).
-- A replayed request that then succeeds gets a processed_requests row, which the status lookup reads first;
-- the replay tool deletes the row when it puts the request back (it is "pending" again until applied).
CREATE TABLE failed_requests (
    request_id  text PRIMARY KEY,
    user_id     text,
    error       text NOT NULL,
    failed_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX failed_requests_failed_at ON failed_requests (failed_at);
