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
    Step {
        what: "instance and event ids without a sequence row written at every insert",
        sqlite: include_str!("schema/v10.sqlite.sql"),
        // A sequence (instances) and the event counter never go back already.
        postgres: "SELECT 1;",
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

#[cfg(test)]
mod tests {
    use super::STEPS;
    use crate::queue::sql::sqlite_floor_id;

    /// A database at step 9 whose newest instance and event were pruned: step 10
    /// keeps their ids from being given again (its floors), and every row it rebuilt.
    #[test]
    fn step_10_carries_the_sequences_high_water_mark_and_the_rows_over() {
        let c = rusqlite::Connection::open_in_memory().expect("open");
        for step in &STEPS[..9] {
            c.execute_batch(step.sqlite).expect("steps 1-9");
        }
        c.execute_batch(
            "INSERT INTO instances(job, created, state, priority, run_at, cached)
               VALUES ('a', 1, 'pending', 0, 0, 0), ('b', 2, 'result', 0, 0, 0),
                      ('c', 3, 'result', 0, 0, 0);
             INSERT INTO events(time, kind, job) VALUES (1, 'push', 'a'), (2, 'push', 'b');
             DELETE FROM instances WHERE id > 1; DELETE FROM events WHERE id = 2;",
        )
        .expect("rows");
        c.execute_batch(STEPS[9].sqlite).expect("step 10");
        // The id the next row gets: the floor's when there is one to give, else
        // SQLite's own choice.
        let next = |table: &str| -> i64 {
            let sql = match table {
                "instances" => concat!(
                    "SELECT coalesce((",
                    sqlite_floor_id!("instances"),
                    "), (SELECT coalesce(max(id), 0) + 1 FROM instances))"
                ),
                _ => concat!(
                    "SELECT coalesce((",
                    sqlite_floor_id!("events"),
                    "), (SELECT coalesce(max(id), 0) + 1 FROM events))"
                ),
            };
            c.query_row(sql, [], |r| r.get(0)).expect("next id")
        };
        assert_eq!((next("instances"), next("events")), (4, 3));
        let kept: (String, String) = c
            .query_row(
                "SELECT (SELECT job FROM instances WHERE id = 1), (SELECT job FROM events WHERE id = 1)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("kept");
        assert_eq!(kept, ("a".to_owned(), "a".to_owned()));
    }
}
