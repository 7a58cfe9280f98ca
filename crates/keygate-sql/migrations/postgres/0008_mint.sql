-- keygate schema v8 (PostgreSQL): delegated minting. A role holding the scope keys:create may set
-- the longest lifetime (whole seconds) of a key minted under it; NULL: it does not let a
-- key mint keys through the admin API.
ALTER TABLE keygate_roles ADD COLUMN mint_max_lifetime_secs BIGINT;
