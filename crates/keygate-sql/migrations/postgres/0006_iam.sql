-- keygate schema v6 (PostgreSQL): roles, identities, per-collection grants and record
-- versions. Times are BIGINT milliseconds since the Unix epoch. Policy columns hold JSON
-- text.

-- Grants beyond scopes x resources, the roles a key holds (JSON arrays), the identity
-- owning it, and a version bumped by every write (conditional writes compare it).
ALTER TABLE keygate_keys ADD COLUMN grants TEXT NOT NULL DEFAULT '[]';
ALTER TABLE keygate_keys ADD COLUMN roles TEXT NOT NULL DEFAULT '[]';
ALTER TABLE keygate_keys ADD COLUMN identity TEXT;
ALTER TABLE keygate_keys ADD COLUMN version BIGINT NOT NULL DEFAULT 0;
CREATE INDEX keygate_keys_identity ON keygate_keys (identity) WHERE identity IS NOT NULL;

-- Roles: named grants, attributes and limits that keys hold by name.
CREATE TABLE keygate_roles (
    name        TEXT   NOT NULL PRIMARY KEY,
    grants      TEXT   NOT NULL DEFAULT '[]',
    attributes  TEXT   NOT NULL DEFAULT '{}',
    rate_limits TEXT   NOT NULL DEFAULT '[]',
    quotas      TEXT   NOT NULL DEFAULT '[]',
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    version     BIGINT NOT NULL DEFAULT 0
);

-- Identities (service principals): limits shared by all their keys.
CREATE TABLE keygate_identities (
    name        TEXT   NOT NULL PRIMARY KEY,
    metadata    TEXT   NOT NULL DEFAULT 'null',
    rate_limits TEXT   NOT NULL DEFAULT '[]',
    quotas      TEXT   NOT NULL DEFAULT '[]',
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    version     BIGINT NOT NULL DEFAULT 0
);

-- Which keys hold which role: derived from keygate_keys.roles by the trigger below
-- (never written directly), so a role change can name every key it reaches.
CREATE TABLE keygate_key_roles (
    role   TEXT NOT NULL,
    key_id TEXT NOT NULL,
    PRIMARY KEY (role, key_id)
);
CREATE INDEX keygate_key_roles_key ON keygate_key_roles (key_id);

CREATE OR REPLACE FUNCTION keygate_key_roles_sync() RETURNS trigger
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $fn$
DECLARE
    held JSONB;
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        DELETE FROM keygate_key_roles WHERE key_id = OLD.id;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        BEGIN
            held := NEW.roles::jsonb;
        EXCEPTION WHEN others THEN
            held := '[]'::jsonb;
        END;
        IF jsonb_typeof(held) = 'array' THEN
            INSERT INTO keygate_key_roles (role, key_id)
            SELECT DISTINCT r.value #>> '{}', NEW.id
            FROM jsonb_array_elements(held) AS r(value)
            WHERE jsonb_typeof(r.value) = 'string'
            ON CONFLICT DO NOTHING;
        END IF;
    END IF;
    RETURN NULL;
END;
$fn$;

CREATE TRIGGER keygate_keys_roles_insert AFTER INSERT ON keygate_keys
    FOR EACH ROW WHEN (NEW.roles <> '[]') EXECUTE FUNCTION keygate_key_roles_sync();
CREATE TRIGGER keygate_keys_roles_update AFTER UPDATE ON keygate_keys
    FOR EACH ROW WHEN (OLD.roles IS DISTINCT FROM NEW.roles OR OLD.id IS DISTINCT FROM NEW.id)
    EXECUTE FUNCTION keygate_key_roles_sync();
CREATE TRIGGER keygate_keys_roles_delete AFTER DELETE ON keygate_keys
    FOR EACH ROW WHEN (OLD.roles <> '[]') EXECUTE FUNCTION keygate_key_roles_sync();

-- Every write to a role (or identity) advances the change sequence of every key naming
-- it, before or after the write, and notifies `keygate_changes`, so followers resolve
-- those keys again; the keys are not touched. Same lock as key writes, so numbers become
-- visible in order.
CREATE OR REPLACE FUNCTION keygate_policy_changed() RETURNS trigger
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $fn$
DECLARE
    now_ms BIGINT := (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT;
    names TEXT[];
    n BIGINT;
BEGIN
    PERFORM pg_advisory_xact_lock(1799814146, hashtext(TG_TABLE_SCHEMA));
    IF TG_OP = 'INSERT' THEN
        names := ARRAY[NEW.name];
    ELSIF TG_OP = 'UPDATE' THEN
        names := ARRAY[OLD.name, NEW.name];
    ELSE
        names := ARRAY[OLD.name];
    END IF;
    IF TG_TABLE_NAME = 'keygate_roles' THEN
        INSERT INTO keygate_changes (key_id, at)
        SELECT key_id, now_ms FROM (
            SELECT DISTINCT key_id FROM keygate_key_roles WHERE role = ANY(names)
        ) AS ids ORDER BY key_id;
    ELSE
        INSERT INTO keygate_changes (key_id, at)
        SELECT id, now_ms FROM keygate_keys WHERE identity = ANY(names) ORDER BY id;
    END IF;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM pg_notify('keygate_changes', TG_TABLE_SCHEMA);
    END IF;
    RETURN NULL;
END;
$fn$;

CREATE TRIGGER keygate_roles_changed AFTER INSERT OR UPDATE OR DELETE ON keygate_roles
    FOR EACH ROW EXECUTE FUNCTION keygate_policy_changed();
CREATE TRIGGER keygate_identities_changed AFTER INSERT OR UPDATE OR DELETE ON keygate_identities
    FOR EACH ROW EXECUTE FUNCTION keygate_policy_changed();
