-- batchdb PostgreSQL schema, step 5: batches and dependencies (see the SQLite text).
CREATE TABLE batches(
  id BIGSERIAL PRIMARY KEY,
  name TEXT NOT NULL UNIQUE,
  created BIGINT NOT NULL
);
ALTER TABLE instances ADD COLUMN batch BIGINT,
  ADD COLUMN deps BIGINT NOT NULL DEFAULT 0,
  ADD COLUMN waiting_on BIGINT NOT NULL DEFAULT 0,
  ADD COLUMN note TEXT;
CREATE INDEX instances_batch ON instances(batch, state) WHERE batch IS NOT NULL;
CREATE TABLE deps(
  instance BIGINT NOT NULL,
  dep BIGINT NOT NULL,
  after_any BOOLEAN NOT NULL,
  PRIMARY KEY(instance, dep)
);
CREATE INDEX deps_dep ON deps(dep);
