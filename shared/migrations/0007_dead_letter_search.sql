-- Dead letters searchable by what an operator knows (the console, console/; the replay tool's filters): every
-- userId and request id of the letter (a pack dead-lettered by the broker holds several), every field value of
-- its requests (a phone, a community name: matched on the whole value), and when it died. Filled at insert time
-- from the parsed letter (worker/dead_letters.py, DeadLetter.search_columns); rows moved before this migration
-- are filled below from their body the same way, except that a list value (room_tags) stays one JSON text here
-- where new rows hold each of its items.
ALTER TABLE dead_letters
    ADD COLUMN dead_at       timestamptz,
    ADD COLUMN user_ids      text[] NOT NULL DEFAULT '{}',
    ADD COLUMN request_ids   text[] NOT NULL DEFAULT '{}',
    ADD COLUMN field_values  text[] NOT NULL DEFAULT '{}';

DO $$
DECLARE
    letter    record;
    document  jsonb;
    requests  jsonb;
BEGIN
    FOR letter IN SELECT id, body, headers, user_id, request_id, moved_at FROM dead_letters LOOP
        BEGIN
            document := convert_from(letter.body, 'UTF8')::jsonb;
        EXCEPTION WHEN OTHERS THEN
            document := NULL;  -- not JSON: found by its ids and reason only
        END;
        requests := CASE
            WHEN jsonb_typeof(document) = 'object' AND document ? 'request_id' THEN jsonb_build_array(document)
            WHEN jsonb_typeof(document -> 'requests') = 'array' THEN document -> 'requests'
            ELSE '[]'::jsonb
        END;
        UPDATE dead_letters SET
            user_ids = ARRAY(
                SELECT DISTINCT u FROM (
                    SELECT r ->> 'user_id' AS u FROM jsonb_array_elements(requests) AS r
                    UNION ALL SELECT letter.user_id
                ) AS ids WHERE u IS NOT NULL),
            request_ids = ARRAY(
                SELECT DISTINCT i FROM (
                    SELECT r ->> 'request_id' AS i FROM jsonb_array_elements(requests) AS r
                    UNION ALL SELECT letter.request_id
                ) AS ids WHERE i IS NOT NULL),
            field_values = ARRAY(
                SELECT DISTINCT v.value
                FROM jsonb_array_elements(requests) AS r,
                     jsonb_each_text(CASE WHEN jsonb_typeof(r -> 'payload') = 'object' THEN r -> 'payload'
                                          ELSE '{}'::jsonb END) AS v
                WHERE v.value IS NOT NULL AND v.value <> ''),
            dead_at = CASE
                WHEN letter.headers ->> 'x-dead-at' ~ '^\d{4}-\d\d-\d\dT' THEN (letter.headers ->> 'x-dead-at')::timestamptz
                ELSE letter.moved_at
            END
        WHERE id = letter.id;
    END LOOP;
END $$;

UPDATE dead_letters SET dead_at = moved_at WHERE dead_at IS NULL;
ALTER TABLE dead_letters ALTER COLUMN dead_at SET NOT NULL, ALTER COLUMN dead_at SET DEFAULT now();

-- Newest first, a page at a time (the console's list; ORDER BY id DESC LIMIT 50).
CREATE INDEX dead_letters_newest ON dead_letters (queue, id DESC);
-- since / until.
CREATE INDEX dead_letters_dead_at ON dead_letters (queue, dead_at);
-- userId, request id and q: "this value is one of the array's" (@>), answered by GIN.
CREATE INDEX dead_letters_user_ids ON dead_letters USING gin (user_ids);
CREATE INDEX dead_letters_request_ids ON dead_letters USING gin (request_ids);
CREATE INDEX dead_letters_field_values ON dead_letters USING gin (field_values);
-- Replaced by dead_letters_user_ids (a pack's every userId, not only its first).
DROP INDEX dead_letters_user_id;
