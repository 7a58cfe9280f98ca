-- keygate schema v2 (PostgreSQL): quota usage counters and the audit table.
-- Times are BIGINT milliseconds since the Unix epoch (UTC).

-- One row per key and counting window. Counters are whole numbers, clamped at
-- 9223372036854775807 (the largest BIGINT); they never go below zero.
CREATE TABLE keygate_usage (
    key_id       TEXT   NOT NULL,
    window_kind  TEXT   NOT NULL,
    window_start BIGINT NOT NULL,
    window_end   BIGINT,
    cost         BIGINT NOT NULL DEFAULT 0,
    requests     BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, window_kind, window_start)
);

CREATE INDEX keygate_usage_start ON keygate_usage (window_start);

-- One row per audit event, in the order they were written.
CREATE TABLE keygate_audit (
    seq    BIGSERIAL PRIMARY KEY,
    at     BIGINT NOT NULL,
    kind   TEXT   NOT NULL,
    key_id TEXT,
    action TEXT,
    actor  TEXT,
    event  TEXT   NOT NULL
);

CREATE INDEX keygate_audit_key ON keygate_audit (key_id, seq);
CREATE INDEX keygate_audit_at ON keygate_audit (at);
