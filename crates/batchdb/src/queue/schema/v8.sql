-- batchdb schema, step 8 (both dialects): index entries only where a lookup can find them.
-- Every lookup of these indexes is by equality (`stdout = $1`, `cache_key = $1`,
-- `conc_key = $1`), which never matches NULL: the NULL entries (an attempt's outputs
-- until it ends, a running instance without a cache or concurrency key) cost a write
-- at every claim and finish and are never read.
DROP INDEX attempts_stdout;
CREATE INDEX attempts_stdout ON attempts(stdout) WHERE stdout IS NOT NULL;
DROP INDEX attempts_stderr;
CREATE INDEX attempts_stderr ON attempts(stderr) WHERE stderr IS NOT NULL;
DROP INDEX instances_cache;
CREATE INDEX instances_cache ON instances(cache_key) WHERE state = 'running' AND cache_key IS NOT NULL;
DROP INDEX instances_conc;
CREATE INDEX instances_conc ON instances(conc_key) WHERE state = 'running' AND conc_key IS NOT NULL;
