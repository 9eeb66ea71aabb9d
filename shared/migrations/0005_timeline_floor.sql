-- One timeline across a change of database server (shared/timeline.py).
--
-- The highest write stamp stored, kept in 64 slots: every batch raises the slot of its own backend
-- (pg_backend_pid() % 64) in the transaction that writes it, so no single row is a point of contention; the
-- floor is the max over the slots.
CREATE TABLE clock_high_water (
    slot   smallint PRIMARY KEY,
    stamp  bigint NOT NULL DEFAULT 0
);
INSERT INTO clock_high_water (slot) SELECT generate_series(0, 63);
-- What is already stored counts too (a deployment from before this table).
UPDATE clock_high_water
SET stamp = (SELECT coalesce(max(value::bigint), 0) FROM customers, jsonb_each_text(field_stamps))
WHERE slot = 0;

-- Every database server the processes have stamped against, and how far the shared timeline runs ahead of its
-- clock. The first process to see a new server (a promoted standby, a restored or migrated database) decides,
-- and every other process adopts the same shift: one timeline for all of them.
CREATE TABLE clock_epochs (
    server      text PRIMARY KEY,          -- postmaster start time, address and port: new for a new server
    shift_us    bigint NOT NULL,           -- timeline = this server's clock_timestamp() + shift_us
    decided_by  text NOT NULL,             -- 'continuity' (a process measured the step) or 'floor' (high water)
    created_at  timestamptz NOT NULL DEFAULT now()
);
