//! Small helpers shared by the suite.

use std::time::Duration;

use batchdb::Hash;
use batchdb::blob::BlobInfo;
use batchdb::queue::{ClaimRequest, Order, PushOptions};

/// A fake payload blob reference (the queue never reads blobs).
pub fn job(n: u64) -> BlobInfo {
    BlobInfo {
        hash: Hash::of(format!("job {n}").as_bytes()),
        size: 5,
    }
}

/// A claim request for `worker` with `limit` and a lease.
pub fn req(worker: &str, limit: usize, lease: Duration) -> ClaimRequest {
    ClaimRequest {
        worker: worker.into(),
        limit,
        lease,
        order: Order::Oldest,
        cache: None,
        cache_all: false,
    }
}

/// Default push options.
pub fn opts() -> PushOptions {
    PushOptions::default()
}
