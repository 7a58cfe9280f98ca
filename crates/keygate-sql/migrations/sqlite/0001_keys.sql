-- keygate schema v1 (SQLite): key records and the change sequence.
-- Times are integer milliseconds since the Unix epoch (UTC).
-- Policy columns hold JSON text (serde_json of the keygate-core types).

CREATE TABLE keygate_keys (
    id           TEXT    NOT NULL PRIMARY KEY,
    prefix       TEXT    NOT NULL,
    digest       BLOB    NOT NULL,
    name         TEXT    NOT NULL,
    owner        TEXT,
    status       TEXT    NOT NULL,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    expires_at   INTEGER,
    scopes       TEXT    NOT NULL DEFAULT '[]',
    resources    TEXT    NOT NULL DEFAULT '[]',
    attributes   TEXT    NOT NULL DEFAULT '{}',
    allowed_ips  TEXT    NOT NULL DEFAULT '[]',
    rate_limits  TEXT    NOT NULL DEFAULT '[]',
    quotas       TEXT    NOT NULL DEFAULT '[]',
    metadata     TEXT    NOT NULL DEFAULT 'null',
    rotated_from TEXT
);

CREATE INDEX keygate_keys_created ON keygate_keys (created_at, id);
CREATE INDEX keygate_keys_owner ON keygate_keys (owner, created_at, id);

-- One row per change to a key row, in commit order (SQLite serializes writers).
CREATE TABLE keygate_changes (
    seq    INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    key_id TEXT    NOT NULL,
    at     INTEGER NOT NULL
);

-- Bookkeeping: `changes_pruned_through` is the highest seq deleted by pruning.
CREATE TABLE keygate_meta (
    name  TEXT    NOT NULL PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO keygate_meta (name, value) VALUES ('changes_pruned_through', 0);

-- Every write to keygate_keys, by keygate or by hand, advances the sequence.
CREATE TRIGGER keygate_keys_changed_insert AFTER INSERT ON keygate_keys
BEGIN
    INSERT INTO keygate_changes (key_id, at)
    VALUES (NEW.id, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER));
END;

CREATE TRIGGER keygate_keys_changed_update AFTER UPDATE ON keygate_keys
BEGIN
    INSERT INTO keygate_changes (key_id, at)
    VALUES (NEW.id, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER));
    INSERT INTO keygate_changes (key_id, at)
    SELECT OLD.id, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)
    WHERE OLD.id <> NEW.id;
END;

CREATE TRIGGER keygate_keys_changed_delete AFTER DELETE ON keygate_keys
BEGIN
    INSERT INTO keygate_changes (key_id, at)
    VALUES (OLD.id, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER));
END;
