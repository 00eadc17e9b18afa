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
    {
        let mut o = ClaimRequest::new(worker, limit, lease);
        o.order = Order::Oldest;
        o.cache = None;
        o.cache_all = false;
        o
    }
}

/// Default push options.
pub fn opts() -> PushOptions {
    PushOptions::default()
}

/// Leaves a running attempt of worker `old` (50 ms lease) in `q`; then `downgrade`
/// turns the database into what schema version 3 left (attempts without ids) and
/// `reopen` opens it again (migrating it). The expired attempt is taken over and
/// handed to the new claimer by worker name and number alone, while the new attempt
/// gets an id of its own.
pub async fn a_version_3_running_attempt_is_taken_over(
    q: std::sync::Arc<dyn batchdb::queue::Queue>,
    downgrade: impl std::future::Future<Output = ()>,
    reopen: impl std::future::Future<Output = std::sync::Arc<dyn batchdb::queue::Queue>>,
) {
    let job = batchdb::blob::BlobInfo {
        hash: batchdb::Hash::of(b"v3"),
        size: 2,
    };
    let inst = q.add(&job, &opts()).await.unwrap();
    let first = q
        .claim(&req("old", 1, Duration::from_millis(50)))
        .await
        .unwrap();
    assert_eq!(first[0].attempt_id.len(), 32, "{:?}", first[0].attempt_id);
    drop(q);
    downgrade.await;
    let q = reopen.await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let taken = q
        .claim(&req("new", 1, Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(taken.len(), 1);
    assert!(taken[0].takeover);
    assert_eq!(
        taken[0].lost,
        Some(batchdb::queue::LostAttempt::new(
            inst.id,
            1,
            "old".into(),
            None
        ))
    );
    assert_eq!(taken[0].attempt_id.len(), 32);
    assert_ne!(taken[0].attempt_id, first[0].attempt_id);
}

/// Milliseconds since the Unix epoch (the time unit of every row).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
