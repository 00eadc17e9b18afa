-- batchdb SQLite schema, step 9: one pending index for both claim orders.
-- Newest first reads it backwards across priorities; oldest first reads one
-- priority at a time, forwards. One index entry less at every push and every claim.
DROP INDEX instances_pending_newest;
DROP INDEX instances_pending_oldest;
CREATE INDEX instances_pending ON instances(priority, created) WHERE state = 'pending';
