-- keygate schema v6 (SQLite): roles, identities, per-collection grants and record versions.
-- Times are integer milliseconds since the Unix epoch. Policy columns hold JSON text.

-- Grants beyond scopes x resources, the roles a key holds (JSON arrays), the identity
-- owning it, and a version bumped by every write (conditional writes compare it).
ALTER TABLE keygate_keys ADD COLUMN grants TEXT NOT NULL DEFAULT '[]';
ALTER TABLE keygate_keys ADD COLUMN roles TEXT NOT NULL DEFAULT '[]';
ALTER TABLE keygate_keys ADD COLUMN identity TEXT;
ALTER TABLE keygate_keys ADD COLUMN version INTEGER NOT NULL DEFAULT 0;
CREATE INDEX keygate_keys_identity ON keygate_keys (identity) WHERE identity IS NOT NULL;

-- Roles: named grants, attributes and limits that keys hold by name.
CREATE TABLE keygate_roles (
    name        TEXT    NOT NULL PRIMARY KEY,
    grants      TEXT    NOT NULL DEFAULT '[]',
    attributes  TEXT    NOT NULL DEFAULT '{}',
    rate_limits TEXT    NOT NULL DEFAULT '[]',
    quotas      TEXT    NOT NULL DEFAULT '[]',
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    version     INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

-- Identities (service principals): limits shared by all their keys.
CREATE TABLE keygate_identities (
    name        TEXT    NOT NULL PRIMARY KEY,
    metadata    TEXT    NOT NULL DEFAULT 'null',
    rate_limits TEXT    NOT NULL DEFAULT '[]',
    quotas      TEXT    NOT NULL DEFAULT '[]',
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    version     INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

-- Which keys hold which role: derived from keygate_keys.roles by the triggers below
-- (never written directly), so a role change can name every key it reaches.
CREATE TABLE keygate_key_roles (
    role   TEXT NOT NULL,
    key_id TEXT NOT NULL,
    PRIMARY KEY (role, key_id)
) WITHOUT ROWID;
CREATE INDEX keygate_key_roles_key ON keygate_key_roles (key_id);

CREATE TRIGGER keygate_keys_roles_insert AFTER INSERT ON keygate_keys
WHEN NEW.roles <> '[]'
BEGIN
    INSERT OR IGNORE INTO keygate_key_roles (role, key_id)
    SELECT value, NEW.id FROM json_each(CASE WHEN json_valid(NEW.roles) THEN NEW.roles ELSE '[]' END)
    WHERE type = 'text';
END;

CREATE TRIGGER keygate_keys_roles_update AFTER UPDATE ON keygate_keys
WHEN OLD.roles IS NOT NEW.roles OR OLD.id IS NOT NEW.id
BEGIN
    DELETE FROM keygate_key_roles WHERE key_id = OLD.id;
    INSERT OR IGNORE INTO keygate_key_roles (role, key_id)
    SELECT value, NEW.id FROM json_each(CASE WHEN json_valid(NEW.roles) THEN NEW.roles ELSE '[]' END)
    WHERE type = 'text';
END;

CREATE TRIGGER keygate_keys_roles_delete AFTER DELETE ON keygate_keys
WHEN OLD.roles <> '[]'
BEGIN
    DELETE FROM keygate_key_roles WHERE key_id = OLD.id;
END;

-- Every write to a role advances the change sequence of every key naming it (before or
-- after the write), so followers resolve those keys again; the keys are not touched.
CREATE TRIGGER keygate_roles_changed_insert AFTER INSERT ON keygate_roles
BEGIN
    INSERT INTO keygate_changes (key_id, at)
    SELECT key_id, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)
    FROM keygate_key_roles WHERE role = NEW.name ORDER BY key_id;
END;

CREATE TRIGGER keygate_roles_changed_update AFTER UPDATE ON keygate_roles
BEGIN
    INSERT INTO keygate_changes (key_id, at)
    SELECT DISTINCT key_id, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)
    FROM keygate_key_roles WHERE role IN (OLD.name, NEW.name) ORDER BY key_id;
END;

CREATE TRIGGER keygate_roles_changed_delete AFTER DELETE ON keygate_roles
BEGIN
    INSERT INTO keygate_changes (key_id, at)
    SELECT key_id, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)
    FROM keygate_key_roles WHERE role = OLD.name ORDER BY key_id;
END;

-- Likewise for identities and the keys they own.
CREATE TRIGGER keygate_identities_changed_insert AFTER INSERT ON keygate_identities
BEGIN
    INSERT INTO keygate_changes (key_id, at)
    SELECT id, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)
    FROM keygate_keys WHERE identity = NEW.name ORDER BY id;
END;

CREATE TRIGGER keygate_identities_changed_update AFTER UPDATE ON keygate_identities
BEGIN
    INSERT INTO keygate_changes (key_id, at)
    SELECT id, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)
    FROM keygate_keys WHERE identity IN (OLD.name, NEW.name) ORDER BY id;
END;

CREATE TRIGGER keygate_identities_changed_delete AFTER DELETE ON keygate_identities
BEGIN
    INSERT INTO keygate_changes (key_id, at)
    SELECT id, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)
    FROM keygate_keys WHERE identity = OLD.name ORDER BY id;
END;
