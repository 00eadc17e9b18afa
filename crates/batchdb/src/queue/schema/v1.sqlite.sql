-- batchdb SQLite schema, version 1.
CREATE TABLE jobs(
  id INTEGER PRIMARY KEY,
  key TEXT NOT NULL UNIQUE,
  size INTEGER NOT NULL,
  created INTEGER NOT NULL
);
CREATE TABLE instances(
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  job TEXT NOT NULL,
  created INTEGER NOT NULL,
  state TEXT NOT NULL,
  priority INTEGER NOT NULL,
  run_at INTEGER NOT NULL,
  timeout_ms INTEGER,
  retries INTEGER,
  cached INTEGER NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  failures INTEGER NOT NULL DEFAULT 0,
  lease_until INTEGER,
  cancel_requested INTEGER NOT NULL DEFAULT 0,
  cache_key TEXT,
  ended INTEGER,
  retried_by INTEGER,
  UNIQUE(job, created)
);
CREATE INDEX instances_pending_newest ON instances(priority, created) WHERE state = 'pending';
CREATE INDEX instances_pending_oldest ON instances(priority DESC, created ASC) WHERE state = 'pending';
CREATE INDEX instances_lease ON instances(lease_until) WHERE state = 'running';
CREATE INDEX instances_cache ON instances(cache_key) WHERE state = 'running';
CREATE INDEX instances_state ON instances(state, id);
CREATE UNIQUE INDEX instances_created ON instances(created);
CREATE TABLE attempts(
  instance INTEGER NOT NULL,
  attempt INTEGER NOT NULL,
  worker TEXT NOT NULL,
  start INTEGER NOT NULL,
  end INTEGER,
  outcome TEXT,
  exit_code INTEGER,
  signal INTEGER,
  stdout TEXT,
  stdout_size INTEGER,
  stderr TEXT,
  stderr_size INTEGER,
  message TEXT,
  cached INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY(instance, attempt)
) WITHOUT ROWID;
CREATE INDEX attempts_stdout ON attempts(stdout);
CREATE INDEX attempts_stderr ON attempts(stderr);
CREATE TABLE cache(
  key TEXT PRIMARY KEY,
  instance INTEGER NOT NULL,
  attempt INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE events(
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  time INTEGER NOT NULL,
  kind TEXT NOT NULL,
  job TEXT NOT NULL,
  created INTEGER,
  instance INTEGER,
  data TEXT
);
