//! Integrity tools: `verify` re-hashes every blob and checks every reference; `gc`
//! removes blobs no row names.

use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use serde::Serialize;

use crate::BatchDb;
use crate::blob::{BlobEntry, Leftover};
use crate::error::{Error, Result};
use crate::hash::Hash;

/// Something `verify` found wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum Problem {
    /// A row names a blob the store does not have.
    Missing {
        /// The blob named.
        hash: Hash,
        /// Who names it.
        owner: String,
    },
    /// A blob's bytes do not hash to its name.
    Corrupt {
        /// The blob's name.
        hash: Hash,
        /// What its bytes hash to.
        actual: Hash,
    },
    /// The database's own consistency check failed.
    Database {
        /// What the check said.
        message: String,
    },
    /// A blob could not be read.
    Unreadable {
        /// The blob's name.
        hash: Hash,
        /// Why.
        error: String,
    },
}

/// What `verify` looked at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct VerifySummary {
    /// Blobs re-hashed.
    pub blobs: u64,
    /// Bytes re-hashed.
    pub bytes: u64,
    /// Payloads and outputs kept inline in the queue, re-hashed.
    pub inline: u64,
    /// Their bytes.
    pub inline_bytes: u64,
    /// Row references checked.
    pub references: u64,
    /// Problems found.
    pub problems: u64,
}

/// How `gc` behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct GcOptions {
    /// Leave blobs stored (or touched) more recently than this alone: a row naming a
    /// blob commits only after the blob is stored, so a young unreferenced blob may be
    /// about to be named.
    pub grace: Duration,
    /// Report what would be removed without removing it.
    pub dry_run: bool,
}

impl GcOptions {
    /// Removes unreferenced blobs older than `grace` (not a dry run).
    pub fn new(grace: Duration) -> Self {
        GcOptions {
            grace,
            dry_run: false,
        }
    }
}

/// What `gc` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct GcSummary {
    /// Blobs examined.
    pub blobs: u64,
    /// Blobs removed (or, with `dry_run`, that would be).
    pub removed: u64,
    /// Bytes those held.
    pub bytes: u64,
}

impl BatchDb {
    /// Checks the database's consistency, re-hashes every blob and checks that every
    /// blob a row names exists, calling
    /// `problem` for each thing found wrong.
    pub async fn verify(&self, mut problem: impl FnMut(Problem)) -> Result<VerifySummary> {
        let mut sum = VerifySummary::default();
        let mut report = |p: Problem, sum: &mut VerifySummary| {
            sum.problems += 1;
            problem(p);
        };
        let check = self.queue().check().await?;
        (sum.inline, sum.inline_bytes) = (check.inline, check.inline_bytes);
        for message in check.problems {
            report(Problem::Database { message }, &mut sum);
        }
        let mut blobs = self.blobs().list();
        while let Some(entry) = blobs.next().await {
            let entry = entry?;
            sum.blobs += 1;
            let mut r = match self.blobs().get(&entry.hash).await {
                Ok(r) => r,
                Err(e) => {
                    report(
                        Problem::Unreadable {
                            hash: entry.hash,
                            error: e.to_string(),
                        },
                        &mut sum,
                    );
                    continue;
                }
            };
            match tokio::io::copy(&mut r, &mut tokio::io::sink()).await {
                Ok(n) => sum.bytes += n,
                Err(e) => {
                    let p = match e.get_ref().and_then(|i| i.downcast_ref::<Error>()) {
                        Some(Error::BlobCorrupt { hash, actual }) => Problem::Corrupt {
                            hash: *hash,
                            actual: *actual,
                        },
                        _ => Problem::Unreadable {
                            hash: entry.hash,
                            error: e.to_string(),
                        },
                    };
                    report(p, &mut sum);
                }
            }
        }
        let mut after = Some(0);
        while let Some(a) = after {
            let (refs, next) = self.queue().references_page(a, 1000).await?;
            for r in refs {
                sum.references += 1;
                if !self.blobs().contains(&r.hash).await? {
                    report(
                        Problem::Missing {
                            hash: r.hash,
                            owner: r.owner,
                        },
                        &mut sum,
                    );
                }
            }
            after = next;
        }
        Ok(sum)
    }

    /// Removes what killed processes left behind and nothing else needs, older than
    /// `opts.grace`: the blob store's temporary files of unfinished writes, and live
    /// output files (`live/<instance>.<attempt>.std{out,err}`) of attempts that are
    /// not running any more. Calls `each` for each (with `dry_run`, removes nothing).
    pub async fn sweep(&self, opts: GcOptions, mut each: impl FnMut(&Leftover)) -> Result<u64> {
        let mut all = self
            .blobs()
            .sweep_leftovers(opts.grace, opts.dry_run)
            .await?;
        if let Some(live) = self.live_dir() {
            let mut stale = Vec::new();
            let candidates = crate::blob::sweep_dir(live, opts.grace, true, |_| false).await?;
            for c in candidates {
                if !self.attempt_running(&c.path).await? {
                    stale.push(c);
                }
            }
            for c in stale {
                if !opts.dry_run {
                    match tokio::fs::remove_file(&c.path).await {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(Error::io("remove", &c.path, e)),
                    }
                }
                all.push(c);
            }
        }
        for l in &all {
            each(l);
        }
        Ok(all.len() as u64)
    }

    /// Whether live output file `path` (`<instance>.<attempt>.<stream>`) belongs to a
    /// running attempt (a name of another shape is kept: true).
    async fn attempt_running(&self, path: &std::path::Path) -> Result<bool> {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let mut parts = name.as_deref().unwrap_or("").split('.');
        let (Some(Ok(id)), Some(Ok(token)), Some("stdout" | "stderr"), None) = (
            parts.next().map(str::parse::<i64>),
            parts.next().map(str::parse::<i64>),
            parts.next(),
            parts.next(),
        ) else {
            return Ok(true);
        };
        match self
            .queue()
            .status(&crate::queue::ClaimToken { id, token })
            .await
        {
            Ok(_) => Ok(true),
            Err(Error::Fenced { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Removes every blob that no row names and that is older than `opts.grace`,
    /// calling `removed` for each.
    pub async fn gc(
        &self,
        opts: GcOptions,
        mut removed: impl FnMut(&BlobEntry),
    ) -> Result<GcSummary> {
        let mut sum = GcSummary::default();
        let now = SystemTime::now();
        let mut blobs = self.blobs().list();
        while let Some(entry) = blobs.next().await {
            let entry = entry?;
            sum.blobs += 1;
            let young = entry
                .modified
                .is_none_or(|m| now.duration_since(m).unwrap_or_default() < opts.grace);
            if young || self.queue().is_referenced(&entry.hash).await? {
                continue;
            }
            if !opts.dry_run && !self.blobs().delete(&entry.hash).await? {
                continue;
            }
            sum.removed += 1;
            sum.bytes += entry.size;
            removed(&entry);
        }
        Ok(sum)
    }
}
