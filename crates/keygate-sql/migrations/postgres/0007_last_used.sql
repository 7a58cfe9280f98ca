-- keygate schema v7 (PostgreSQL): when each key was last used, to the minute.
-- Times are BIGINT milliseconds since the Unix epoch.

-- Apart from keygate_keys so that writing a last-used time fires none of its triggers:
-- no change sequence, no notification, no version bump. Written in the background by the
-- verifier's flush (one row per key used since the last flush), never per request.
CREATE TABLE keygate_key_last_used (
    key_id  TEXT   NOT NULL PRIMARY KEY,
    used_at BIGINT NOT NULL
);
