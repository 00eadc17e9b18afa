//! Decoding rows once for every backend: each backend's row type implements [`Row`]
//! (columns by index, NULL as `None`, a decode failure in its own error type), and
//! the decoders shared by both backends read through it.

use std::time::Duration;

use super::context::{Concurrency, ExecContext, Needs};
use super::types::{AttemptReport, Claim, ClaimToken, State};
use crate::blob::BlobInfo;
use crate::hash::Hash;

/// A database row, read by column index.
pub(crate) trait Row {
    /// The backend's error type.
    type Error;

    /// An integer column (NULL is `None`).
    fn int(&self, i: usize) -> Result<Option<i64>, Self::Error>;

    /// A boolean column (stored as an integer by SQLite).
    fn flag(&self, i: usize) -> Result<bool, Self::Error>;

    /// A text column, borrowed from the row (NULL is `None`).
    fn str(&self, i: usize) -> Result<Option<&str>, Self::Error>;

    /// A binary column (NULL is `None`).
    fn bytes(&self, i: usize) -> Result<Option<Vec<u8>>, Self::Error>;

    /// The backend's error for a value batchdb never writes (it maps to
    /// [`crate::Error::Corrupt`]).
    fn corrupt(what: String) -> Self::Error;

    /// [`corrupt`](Row::corrupt), called on a row (where its type has no name).
    fn invalid(&self, what: String) -> Self::Error {
        Self::corrupt(what)
    }

    /// A text column (NULL is `None`).
    fn text(&self, i: usize) -> Result<Option<String>, Self::Error> {
        Ok(self.str(i)?.map(String::from))
    }

    /// A NOT NULL text column parsed in place (a hash or a state: no allocation, as a
    /// page of a million rows reads millions of them).
    fn parsed<T: std::str::FromStr<Err = crate::Error>>(&self, i: usize) -> Result<T, Self::Error> {
        let s = self
            .str(i)?
            .ok_or_else(|| Self::corrupt(format!("column {i} is NULL")))?;
        s.parse()
            .map_err(|e: crate::Error| Self::corrupt(e.to_string()))
    }

    /// A NOT NULL integer column.
    fn req_int(&self, i: usize) -> Result<i64, Self::Error> {
        self.int(i)?
            .ok_or_else(|| Self::corrupt(format!("column {i} is NULL")))
    }

    /// An integer column that holds a non-negative count or number of milliseconds.
    fn unsigned<T: TryFrom<i64>>(&self, i: usize) -> Result<Option<T>, Self::Error> {
        self.int(i)?
            .map(|n| T::try_from(n).map_err(|_| Self::corrupt(format!("column {i} is {n}"))))
            .transpose()
    }

    /// A hash column.
    fn hash(&self, i: usize) -> Result<Hash, Self::Error> {
        self.parsed(i)
    }

    /// A hash column that may be NULL.
    fn opt_hash(&self, i: usize) -> Result<Option<Hash>, Self::Error> {
        match self.str(i)? {
            Some(_) => self.parsed(i).map(Some),
            None => Ok(None),
        }
    }

    /// A NOT NULL text column.
    fn req_text(&self, i: usize) -> Result<String, Self::Error> {
        self.text(i)?
            .ok_or_else(|| Self::corrupt(format!("column {i} is NULL")))
    }

    /// An `INTEGER` column (exit codes, signals).
    fn int32(&self, i: usize) -> Result<Option<i32>, Self::Error> {
        self.int(i)?
            .map(|n| i32::try_from(n).map_err(|_| Self::corrupt(format!("column {i} is {n}"))))
            .transpose()
    }

    /// An execution-context column (JSON; NULL is the empty context).
    fn exec_context(&self, i: usize) -> Result<ExecContext, Self::Error> {
        ExecContext::from_text(self.str(i)?).map_err(Self::corrupt)
    }

    /// A needs column (`name=amount,...`; NULL is no needs).
    fn needs(&self, i: usize) -> Result<Needs, Self::Error> {
        Needs::from_text(self.str(i)?).map_err(Self::corrupt)
    }

    /// A concurrency key in column `i` and its limit in column `i + 1`.
    fn concurrency(&self, i: usize) -> Result<Option<Concurrency>, Self::Error> {
        let Some(key) = self.text(i)? else {
            return Ok(None);
        };
        let limit = self.unsigned(i + 1)?.unwrap_or(1);
        Ok(Some(Concurrency { key, limit }))
    }

    /// A state column.
    fn state(&self, i: usize) -> Result<State, Self::Error> {
        self.parsed(i)
    }

    /// A stored output: its hash column `h` and size column `size` (`None` when the
    /// hash is NULL).
    fn blob(&self, h: usize, size: usize) -> Result<Option<BlobInfo>, Self::Error> {
        let Some(hash) = self.opt_hash(h)? else {
            return Ok(None);
        };
        Ok(Some(BlobInfo {
            hash,
            size: self.unsigned(size)?.unwrap_or(0),
        }))
    }
}

/// The columns of `instances` a claim needs, in the order [`candidate`] reads them.
/// (A macro, so that backends can `concat!` it into their claim statements.)
macro_rules! claim_cols {
    () => {
        "id, job, created, failures, timeout_ms, retries, cached, attempts, deps, run_at, \
         context, needs, conc_key, conc_limit, \
         (SELECT payload FROM jobs WHERE jobs.key = instances.job)"
    };
}
pub(crate) use claim_cols;

/// How many columns [`claim_cols!`] selects (what a statement selects after them
/// starts at this index).
pub(crate) const CLAIM_COLS: usize = 15;

/// An instance a claim may hand out.
pub(crate) struct Candidate {
    pub id: i64,
    pub job: Hash,
    pub created: i64,
    pub failures: u32,
    pub timeout: Option<Duration>,
    pub retries: Option<u32>,
    pub cached: bool,
    pub attempts: i64,
    pub deps: u64,
    /// When it became due (epoch ms): how long it has waited.
    pub run_at: i64,
    pub context: ExecContext,
    pub needs: Needs,
    pub conc: Option<Concurrency>,
    /// The job's payload if the queue keeps it inline.
    pub payload: Option<Vec<u8>>,
}

/// Reads a row selected as [`claim_cols!`].
pub(crate) fn candidate<R: Row>(r: &R) -> Result<Candidate, R::Error> {
    Ok(Candidate {
        id: r.req_int(0)?,
        job: r.hash(1)?,
        created: r.req_int(2)?,
        failures: r.unsigned(3)?.unwrap_or(0),
        timeout: r.unsigned::<u64>(4)?.map(Duration::from_millis),
        retries: r.unsigned(5)?,
        cached: r.flag(6)?,
        attempts: r.req_int(7)?,
        deps: r.unsigned(8)?.unwrap_or(0),
        run_at: r.req_int(9)?,
        context: r.exec_context(10)?,
        needs: r.needs(11)?,
        conc: r.concurrency(12)?,
        payload: r.bytes(14)?,
    })
}

impl Candidate {
    /// The claim of this instance under a new attempt (`token`, `attempt_id`) that
    /// started at `start`.
    pub(crate) fn claim(
        &self,
        (token, attempt_id): (ClaimToken, String),
        start: i64,
        takeover: bool,
        cache_hit: Option<AttemptReport>,
    ) -> Claim {
        Claim {
            token,
            job: self.job,
            created: self.created,
            start,
            failures: self.failures,
            timeout: self.timeout,
            retries: self.retries,
            deps: self.deps,
            attempt_id,
            takeover,
            lost: None,
            cache_hit,
            context: self.context.clone(),
            needs: self.needs.clone(),
            assigned: super::Resources::default(),
            payload: self.payload.clone(),
        }
    }
}
