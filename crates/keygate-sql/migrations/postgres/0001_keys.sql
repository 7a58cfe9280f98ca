-- keygate schema v1 (PostgreSQL): key records and the change sequence.
-- Times are BIGINT milliseconds since the Unix epoch (UTC).
-- Policy columns hold JSON text (serde_json of the keygate-core types).
-- Objects are created in the current schema (the first of search_path).

CREATE TABLE keygate_keys (
    id           TEXT   NOT NULL PRIMARY KEY,
    prefix       TEXT   NOT NULL,
    digest       BYTEA  NOT NULL,
    name         TEXT   NOT NULL,
    owner        TEXT,
    status       TEXT   NOT NULL,
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL,
    expires_at   BIGINT,
    scopes       TEXT   NOT NULL DEFAULT '[]',
    resources    TEXT   NOT NULL DEFAULT '[]',
    attributes   TEXT   NOT NULL DEFAULT '{}',
    allowed_ips  TEXT   NOT NULL DEFAULT '[]',
    rate_limits  TEXT   NOT NULL DEFAULT '[]',
    quotas       TEXT   NOT NULL DEFAULT '[]',
    metadata     TEXT   NOT NULL DEFAULT 'null',
    rotated_from TEXT
);

CREATE INDEX keygate_keys_created ON keygate_keys (created_at, id);
CREATE INDEX keygate_keys_owner ON keygate_keys (owner, created_at, id);

-- One row per change to a key row. Writers take a transaction-scoped advisory lock before
-- taking a number, so numbers become visible in order and a follower reading
-- `seq > cursor` never skips a change that commits late.
CREATE TABLE keygate_changes (
    seq    BIGSERIAL PRIMARY KEY,
    key_id TEXT   NOT NULL,
    at     BIGINT NOT NULL
);

-- Bookkeeping: `changes_pruned_through` is the highest seq deleted by pruning.
CREATE TABLE keygate_meta (
    name  TEXT   NOT NULL PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO keygate_meta (name, value) VALUES ('changes_pruned_through', 0);

-- Every write to keygate_keys, by keygate or by hand, advances the sequence and notifies
-- channel `keygate_changes` with the schema name as payload (delivered at commit).
CREATE FUNCTION keygate_keys_changed() RETURNS trigger
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $fn$
DECLARE
    now_ms BIGINT := (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT;
    n BIGINT;
BEGIN
    PERFORM pg_advisory_xact_lock(1799814146, hashtext(TG_TABLE_SCHEMA));
    IF TG_OP = 'INSERT' THEN
        INSERT INTO keygate_changes (key_id, at) SELECT id, now_ms FROM new_rows ORDER BY id;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO keygate_changes (key_id, at)
        SELECT id, now_ms FROM (SELECT id FROM new_rows UNION SELECT id FROM old_rows) AS ids
        ORDER BY id;
    ELSE
        INSERT INTO keygate_changes (key_id, at) SELECT id, now_ms FROM old_rows ORDER BY id;
    END IF;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM pg_notify('keygate_changes', TG_TABLE_SCHEMA);
    END IF;
    RETURN NULL;
END;
$fn$;

CREATE TRIGGER keygate_keys_changed_insert AFTER INSERT ON keygate_keys
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION keygate_keys_changed();
CREATE TRIGGER keygate_keys_changed_update AFTER UPDATE ON keygate_keys
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION keygate_keys_changed();
CREATE TRIGGER keygate_keys_changed_delete AFTER DELETE ON keygate_keys
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION keygate_keys_changed();
