-- batchdb PostgreSQL schema, step 7: execution context, resources, concurrency keys,
-- accounting.
-- What the instance runs with (JSON: cwd, env, limits), what it needs from a worker
-- (`name=amount,...`, sorted), and its concurrency key and that key's limit.
ALTER TABLE instances ADD COLUMN context TEXT;
ALTER TABLE instances ADD COLUMN needs TEXT;
ALTER TABLE instances ADD COLUMN conc_key TEXT;
ALTER TABLE instances ADD COLUMN conc_limit BIGINT;
CREATE INDEX instances_conc ON instances(conc_key) WHERE state = 'running';
-- What each attempt used (peak memory in bytes, CPU in ms) and the resource units
-- it was given (JSON).
ALTER TABLE attempts ADD COLUMN max_rss BIGINT;
ALTER TABLE attempts ADD COLUMN cpu_user_ms BIGINT;
ALTER TABLE attempts ADD COLUMN cpu_sys_ms BIGINT;
ALTER TABLE attempts ADD COLUMN resources TEXT;
-- Live workers and what they declared (JSON), so a job no live worker could ever
-- run is shown as such; `until` is when the entry lapses unless renewed.
CREATE TABLE workers(
  name TEXT PRIMARY KEY,
  resources TEXT NOT NULL,
  seen BIGINT NOT NULL,
  until BIGINT NOT NULL
);
