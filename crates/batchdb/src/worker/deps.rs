//! The file a dependent's runner reads its inputs from (`BATCHDB_DEPS`): one
//! `JOBKEY RESULTID` line per dependency result, in the dependencies' push order.
//! Written a page at a time (a fan-in of 100,000 holds one page), removed when the
//! attempt is over.

use std::io::Write;
use std::path::PathBuf;

use super::Worker;
use crate::error::{Error, Result};
use crate::hash::{Hash, Hasher};
use crate::queue::Claim;

/// Results fetched per page.
const PAGE: usize = 4096;

/// A written `BATCHDB_DEPS` file, removed when dropped.
pub(super) struct DepsFile {
    /// Where it is.
    pub path: PathBuf,
    /// The sha256 of its bytes: the inputs part of the attempt's result-cache key.
    pub digest: Hash,
}

impl Drop for DepsFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Worker {
    /// Writes claim `claim`'s dependency file into the temporary directory, if it has
    /// dependencies.
    pub(super) async fn deps_file(&self, claim: &Claim) -> Result<Option<DepsFile>> {
        if claim.deps == 0 {
            return Ok(None);
        }
        let path = std::env::temp_dir().join(format!("batchdb-deps-{}", claim.attempt_id));
        let io = |op| {
            let path = path.clone();
            move |source| Error::Io { op, path, source }
        };
        let file = std::fs::File::create(&path).map_err(io("create"))?;
        // Removed from here on, whatever fails.
        let mut guard = DepsFile {
            path: path.clone(),
            digest: Hash::of(b""),
        };
        let mut out = std::io::BufWriter::new(file);
        let mut hasher = Hasher::new();
        let mut after = 0;
        loop {
            let page = self
                .port
                .dependency_results(claim.token.id, after, PAGE)
                .await?;
            let Some(last) = page.last() else { break };
            after = last.instance;
            for d in &page {
                let line = d.line();
                hasher.update(line.as_bytes());
                out.write_all(line.as_bytes()).map_err(io("write"))?;
            }
        }
        out.flush().map_err(io("write"))?;
        guard.digest = hasher.finish();
        Ok(Some(guard))
    }
}
