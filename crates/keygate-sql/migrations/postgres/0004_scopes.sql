-- keygate schema v4 (PostgreSQL): the scope vocabulary servers register at start-up, which
-- the CLI checks new keys' scopes against. Times are BIGINT milliseconds since the Unix epoch.

-- One row per scope some server's routes require. needs_collection is true when every
-- route requiring the scope also names a collection.
CREATE TABLE keygate_scopes (
    scope            TEXT    NOT NULL PRIMARY KEY,
    needs_collection BOOLEAN NOT NULL,
    registered_at    BIGINT  NOT NULL
);
