"""The worker: consumes shard queues, applies upserts to Postgres in batches, replies to the gateway."""
