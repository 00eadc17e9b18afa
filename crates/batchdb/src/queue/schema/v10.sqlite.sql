-- batchdb SQLite schema, step 10: fewer pages written at every push.
-- Instance and event ids without AUTOINCREMENT, which rewrote `sqlite_sequence` at
-- every insert: a page of every push's commit. An id is still never given twice,
-- even after a prune removed the newest rows: each prune step first records the
-- tables' highest ids in `id_floors` (written only then), and a write transaction
-- whose table's highest id is below its floor gives its first new row one past the
-- floor (SQLite's own choice, one past the highest, otherwise).
CREATE TABLE id_floors(name TEXT PRIMARY KEY, id INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO id_floors(name, id)
  SELECT name, seq FROM sqlite_sequence WHERE name IN ('instances', 'events');

CREATE TABLE instances_v10(
  id INTEGER PRIMARY KEY,
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
  batch INTEGER,
  deps INTEGER NOT NULL DEFAULT 0,
  waiting_on INTEGER NOT NULL DEFAULT 0,
  note TEXT,
  context TEXT,
  needs TEXT,
  conc_key TEXT,
  conc_limit INTEGER,
  UNIQUE(job, created)
);
INSERT INTO instances_v10(id, job, created, state, priority, run_at, timeout_ms, retries,
    cached, attempts, failures, lease_until, cancel_requested, cache_key, ended, retried_by,
    batch, deps, waiting_on, note, context, needs, conc_key, conc_limit)
  SELECT id, job, created, state, priority, run_at, timeout_ms, retries,
    cached, attempts, failures, lease_until, cancel_requested, cache_key, ended, retried_by,
    batch, deps, waiting_on, note, context, needs, conc_key, conc_limit
  FROM instances;
DROP TABLE instances;
ALTER TABLE instances_v10 RENAME TO instances;
CREATE INDEX instances_pending ON instances(priority, created) WHERE state = 'pending';
CREATE INDEX instances_lease ON instances(lease_until) WHERE state = 'running';
CREATE INDEX instances_cache ON instances(cache_key) WHERE state = 'running' AND cache_key IS NOT NULL;
CREATE INDEX instances_conc ON instances(conc_key) WHERE state = 'running' AND conc_key IS NOT NULL;
CREATE INDEX instances_needs ON instances(run_at) WHERE state = 'pending' AND needs IS NOT NULL;
-- No entry for pending instances (the pending index finds those): one page less at
-- every push and one entry less at every claim. A lookup by one other state says
-- `state <> 'pending'` as well, so that SQLite may use it.
CREATE INDEX instances_state ON instances(state, id) WHERE state <> 'pending';
CREATE UNIQUE INDEX instances_created ON instances(created);
CREATE INDEX instances_batch ON instances(batch, state) WHERE batch IS NOT NULL;

CREATE TABLE events_v10(
  id INTEGER PRIMARY KEY,
  time INTEGER NOT NULL,
  kind TEXT NOT NULL,
  job TEXT NOT NULL,
  created INTEGER,
  instance INTEGER,
  data TEXT
);
INSERT INTO events_v10(id, time, kind, job, created, instance, data)
  SELECT id, time, kind, job, created, instance, data FROM events;
DROP TABLE events;
ALTER TABLE events_v10 RENAME TO events;

