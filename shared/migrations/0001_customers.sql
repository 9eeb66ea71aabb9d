-- Customers, keyed by the bots' external userId.
CREATE TABLE customers (
    id              bigserial PRIMARY KEY,
    user_id         text NOT NULL UNIQUE,
    bot_id          text,
    nickname        text,
    name            text,
    phone           text,
    backup_phone    text,
    wechat          text,
    status          smallint NOT NULL DEFAULT 1 CHECK (status BETWEEN 1 AND 5),
    community       text,
    business_type   text NOT NULL DEFAULT 'whole_rent',
    room_type       text NOT NULL DEFAULT 'one_bedroom',
    room_tags       jsonb,
    move_in_date    date,
    lease_period    integer CHECK (lease_period > 0),
    price_range     text,
    source_channel  text NOT NULL DEFAULT 'referral',
    creator         text NOT NULL DEFAULT '外部系统',
    internal_notes  text,
    -- Per-field write stamps {"field": stamp}: a field changes only for a newer stamp, so the row
    -- converges to "requests applied in gateway order" whatever order they are delivered in.
    field_stamps    jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Only the main phone is unique across customers.
CREATE UNIQUE INDEX customers_phone_key ON customers (phone) WHERE phone IS NOT NULL;

-- Every applied request, written in the same transaction as its upsert: redeliveries answer with the
-- first outcome, and Idempotency-Key retries are recognised.
CREATE TABLE processed_requests (
    request_id       text PRIMARY KEY,
    user_id          text NOT NULL,
    customer_id      bigint,
    outcome          text NOT NULL,
    idempotency_key  text,
    body_hash        text,
    processed_at     timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX processed_requests_idempotency_key ON processed_requests (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX processed_requests_processed_at ON processed_requests (processed_at);

-- What the replay tool did, and who asked.
CREATE TABLE dead_letter_audit (
    id           bigserial PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT now(),
    actor        text NOT NULL,
    action       text NOT NULL,
    filters      jsonb NOT NULL DEFAULT '{}'::jsonb,
    request_ids  text[] NOT NULL DEFAULT '{}',
    outcome      text NOT NULL
);
