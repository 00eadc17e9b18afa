-- batchdb SQLite schema, step 5: batches and dependencies.
-- A batch is a name instances are pushed under; `batch` names it by id.
CREATE TABLE batches(
  id INTEGER PRIMARY KEY,
  name TEXT NOT NULL UNIQUE,
  created INTEGER NOT NULL
);
ALTER TABLE instances ADD COLUMN batch INTEGER;
-- How many instances it depends on, and how many of those have not ended as they
-- must: an instance with waiting_on > 0 is in state 'waiting' and never claimed.
ALTER TABLE instances ADD COLUMN deps INTEGER NOT NULL DEFAULT 0;
ALTER TABLE instances ADD COLUMN waiting_on INTEGER NOT NULL DEFAULT 0;
-- Why an instance ended without an attempt saying so (a dependency failed).
ALTER TABLE instances ADD COLUMN note TEXT;
CREATE INDEX instances_batch ON instances(batch, state) WHERE batch IS NOT NULL;
-- `instance` waits for `dep`: until it has a result, or (after_any) until it ended.
CREATE TABLE deps(
  instance INTEGER NOT NULL,
  dep INTEGER NOT NULL,
  after_any INTEGER NOT NULL,
  PRIMARY KEY(instance, dep)
) WITHOUT ROWID;
CREATE INDEX deps_dep ON deps(dep);
