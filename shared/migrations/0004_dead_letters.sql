-- Dead letters, moved out of the broker's dead-letter queue (worker/dead_letters.py). Reading them here changes
-- nothing: on a quorum queue every get-and-return counts as a delivery, and a delivery limit (RabbitMQ 4's
-- default of 20, or an operator's policy) would drop a dead letter that was only listed.
CREATE TABLE dead_letters (
    id             bigserial PRIMARY KEY,
    -- The queue it came from (<AMQP_PREFIX>.dead): several deployments may share one database.
    queue          text NOT NULL,
    -- sha256 of the message's body and headers: a message moved twice (its ack lost) is stored once.
    fingerprint    text NOT NULL,
    request_id     text,
    user_id        text,
    reason         text NOT NULL DEFAULT '',
    headers        jsonb NOT NULL DEFAULT '{}'::jsonb,
    body           bytea NOT NULL,
    moved_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (queue, fingerprint)
);
CREATE INDEX dead_letters_user_id ON dead_letters (queue, user_id);
CREATE INDEX dead_letters_request_id ON dead_letters (request_id);
