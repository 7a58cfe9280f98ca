-- keygate schema v5: each key's lineage, the id of the first key of its rotation chain.
-- Rate limits and quotas are counted per lineage, so rotating a key does not reset its
-- usage. NULL (every row written before this version, and every key that is the first
-- of its chain) means the key's own id.

ALTER TABLE keygate_keys ADD COLUMN lineage TEXT;
