//! The schema, as one numbered list of steps with each dialect's text side by side.
//! Both backends apply the steps a database has not seen yet, in order, in one
//! transaction under their migration lock, and record the version they reached
//! (SQLite: `PRAGMA user_version`; PostgreSQL: a `schema_migrations` row per step).

/// One schema step: what it does, in each dialect.
pub(crate) struct Step {
    /// What the step adds, for readers.
    #[allow(dead_code)]
    pub what: &'static str,
    /// The statements for SQLite.
    pub sqlite: &'static str,
    /// The statements for PostgreSQL (run with batchdb's schema as the search path).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub postgres: &'static str,
}

/// The steps, in order: step `i` takes a database to version `i + 1`.
pub(crate) const STEPS: &[Step] = &[
    Step {
        what: "the tables: jobs, instances, attempts, cache, events",
        sqlite: include_str!("schema/v1.sqlite.sql"),
        postgres: include_str!("schema/v1.postgres.sql"),
    },
    Step {
        what: "small payloads kept inline in the job row",
        sqlite: "ALTER TABLE jobs ADD COLUMN payload BLOB;",
        postgres: "ALTER TABLE jobs ADD COLUMN payload BYTEA;",
    },
    Step {
        what: "small outputs kept inline, by hash",
        sqlite: "CREATE TABLE inline_blobs(key TEXT PRIMARY KEY, data BLOB NOT NULL) WITHOUT ROWID;",
        postgres: "CREATE TABLE inline_blobs(key TEXT PRIMARY KEY, data BYTEA NOT NULL);",
    },
    Step {
        what: "each attempt's random id, which its processes carry",
        sqlite: "ALTER TABLE attempts ADD COLUMN attempt_id TEXT;",
        postgres: "ALTER TABLE attempts ADD COLUMN attempt_id TEXT;",
    },
    Step {
        what: "batches, dependencies between instances, the waiting state",
        sqlite: include_str!("schema/v5.sqlite.sql"),
        postgres: include_str!("schema/v5.postgres.sql"),
    },
    Step {
        what: "result-cache entries found by instance (prune removes them with it)",
        sqlite: "CREATE INDEX cache_instance ON cache(instance);",
        postgres: "CREATE INDEX cache_instance ON cache(instance);",
    },
    Step {
        what: "execution context, needs, concurrency keys, accounting, live workers",
        sqlite: include_str!("schema/v7.sqlite.sql"),
        postgres: include_str!("schema/v7.postgres.sql"),
    },
    Step {
        what: "no index entries for NULL outputs, cache keys and concurrency keys",
        sqlite: include_str!("schema/v8.sql"),
        postgres: include_str!("schema/v8.sql"),
    },
    Step {
        what: "one pending index for both claim orders",
        sqlite: include_str!("schema/v9.sqlite.sql"),
        postgres: include_str!("schema/v9.postgres.sql"),
    },
];

/// The schema version this build writes and understands, on every backend.
#[allow(clippy::cast_possible_wrap)] // a handful of steps
pub const SCHEMA_VERSION: i64 = STEPS.len() as i64;

/// The steps a database at `version` has not had yet.
pub(crate) fn pending(version: i64) -> impl Iterator<Item = (i64, &'static Step)> {
    STEPS
        .iter()
        .zip(1..)
        .skip(usize::try_from(version).unwrap_or(0))
        .map(|(s, v)| (v, s))
}
