-- keygate schema v4 (SQLite): the scope vocabulary servers register at start-up, which the
-- CLI checks new keys' scopes against. Times are integer milliseconds since the Unix epoch.

-- One row per scope some server's routes require. needs_collection is 1 when every route
-- requiring the scope also names a collection.
CREATE TABLE keygate_scopes (
    scope            TEXT    NOT NULL PRIMARY KEY,
    needs_collection INTEGER NOT NULL,
    registered_at    INTEGER NOT NULL
) WITHOUT ROWID;
