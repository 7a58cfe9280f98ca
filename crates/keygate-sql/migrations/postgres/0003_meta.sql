-- keygate schema v3: settings that guard how the database is used, as text.
--   min_keygate_version  the oldest keygate that may open this database (MAJOR.MINOR.PATCH);
--                        an older build refuses it, a newer one raises it when its own
--                        schema needs that.
--   pepper_fingerprint   written at first use by a process that makes or verifies keys:
--                        `none`, or `blake3:` and 64 hex digits derived from the pepper
--                        (never the pepper); a process with another pepper is refused.

CREATE TABLE keygate_settings (
    name  TEXT NOT NULL PRIMARY KEY,
    value TEXT NOT NULL
);
INSERT INTO keygate_settings (name, value) VALUES ('min_keygate_version', '0.1.0');
