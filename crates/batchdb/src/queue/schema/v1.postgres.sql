-- batchdb PostgreSQL schema, version 1 (in the schema named by the queue, `batchdb`
-- by default). Times are epoch milliseconds, as in the SQLite backend.
CREATE TABLE jobs(
  id BIGSERIAL PRIMARY KEY,
  key TEXT NOT NULL UNIQUE,
  size BIGINT NOT NULL,
  created BIGINT NOT NULL
);
CREATE TABLE instances(
  id BIGSERIAL PRIMARY KEY,
  job TEXT NOT NULL,
  created BIGINT NOT NULL UNIQUE,
  state TEXT NOT NULL,
  priority BIGINT NOT NULL,
  run_at BIGINT NOT NULL,
  timeout_ms BIGINT,
  retries BIGINT,
  cached BOOLEAN NOT NULL,
  attempts BIGINT NOT NULL DEFAULT 0,
  failures BIGINT NOT NULL DEFAULT 0,
  lease_until BIGINT,
  cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
  cache_key TEXT,
  ended BIGINT,
  retried_by BIGINT
);
CREATE INDEX instances_pending_newest ON instances(priority DESC, created DESC, id DESC) WHERE state = 'pending';
CREATE INDEX instances_pending_oldest ON instances(priority DESC, created ASC, id ASC) WHERE state = 'pending';
CREATE INDEX instances_lease ON instances(lease_until) WHERE state = 'running';
CREATE INDEX instances_cache ON instances(cache_key) WHERE state = 'running';
CREATE INDEX instances_state ON instances(state, id);
CREATE INDEX instances_job ON instances(job);
CREATE TABLE attempts(
  instance BIGINT NOT NULL,
  attempt BIGINT NOT NULL,
  worker TEXT NOT NULL,
  start BIGINT NOT NULL,
  "end" BIGINT,
  outcome TEXT,
  exit_code INTEGER,
  signal INTEGER,
  stdout TEXT,
  stdout_size BIGINT,
  stderr TEXT,
  stderr_size BIGINT,
  message TEXT,
  cached BOOLEAN NOT NULL DEFAULT FALSE,
  PRIMARY KEY(instance, attempt)
);
CREATE INDEX attempts_stdout ON attempts(stdout);
CREATE INDEX attempts_stderr ON attempts(stderr);
CREATE TABLE cache(
  key TEXT PRIMARY KEY,
  instance BIGINT NOT NULL,
  attempt BIGINT NOT NULL
);
-- Event ids are handed out from `counters` at the very end of each transaction, so
-- the row lock orders them by commit: a reader that saw event n never later finds a
-- new event below n.
CREATE TABLE events(
  id BIGINT PRIMARY KEY,
  time BIGINT NOT NULL,
  kind TEXT NOT NULL,
  job TEXT NOT NULL,
  created BIGINT,
  instance BIGINT,
  data TEXT
);
CREATE TABLE counters(
  name TEXT PRIMARY KEY,
  value BIGINT NOT NULL
);
INSERT INTO counters(name, value) VALUES ('event', 0), ('created', 0);
