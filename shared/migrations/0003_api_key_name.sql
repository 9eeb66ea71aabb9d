-- The NAME of the API key each request came with (NULL when the gateway ran without keys, and for requests
-- applied before this column existed). Never the key: only names and hashes are configured anywhere.
ALTER TABLE processed_requests ADD COLUMN api_key_name text;
