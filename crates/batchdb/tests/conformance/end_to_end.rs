//! Tests of the facade and the worker over every backend: runners, events, results.

use std::sync::Arc;
use std::time::Duration;

use batchdb::queue::{EventKind, Finished, ListKind, ListRow, PushOptions};
use batchdb::runner::{Duplex, FnRunner, RunContext, ShellRunner};
use batchdb::worker::{Report, WorkerOptions};
use batchdb::{BatchDb, Hash};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::Backend;

/// Runs a worker until the queue is empty and returns its reports.
async fn drain(db: &BatchDb, runner: Arc<dyn batchdb::runner::Runner>) -> Vec<Report> {
    drain_with(db, runner, WorkerOptions::default()).await
}

/// [`drain`] with `opts` (its concurrency set to 2, `until_empty` on).
async fn drain_with(
    db: &BatchDb,
    runner: Arc<dyn batchdb::runner::Runner>,
    mut opts: WorkerOptions,
) -> Vec<Report> {
    opts.concurrency = 2;
    opts.until_empty = true;
    let (tx, mut rx) = mpsc::unbounded_channel();
    db.worker(runner, opts).run(Some(tx)).await.expect("worker");
    let mut out = Vec::new();
    while let Ok(r) = rx.try_recv() {
        out.push(r);
    }
    out
}

async fn rows(db: &BatchDb, kind: ListKind) -> Vec<ListRow> {
    let s = db.list(kind, None);
    futures_util::pin_mut!(s);
    let mut v = Vec::new();
    while let Some(r) = s.next().await {
        v.push(r.unwrap());
    }
    v
}

async fn read(db: &BatchDb, h: &Hash) -> Vec<u8> {
    let mut v = Vec::new();
    db.get(h).await.unwrap().read_to_end(&mut v).await.unwrap();
    v
}

/// The seed's fake runner: reads the payload and answers with it upper-cased; a
/// payload saying `fail` makes the output stream break instead.
fn fake_runner() -> Arc<dyn batchdb::runner::Runner> {
    Arc::new(FnRunner::new(
        "upper",
        |_ctx: &RunContext| -> std::io::Result<Duplex> {
            let (stdin_w, mut stdin_r) = tokio::io::duplex(1024);
            let (mut out_w, out_r) = tokio::io::duplex(1024);
            tokio::spawn(async move {
                let mut input = Vec::new();
                let _ = stdin_r.read_to_end(&mut input).await;
                if input == b"fail" {
                    // Dropping the writer mid-way is a clean EOF; abort with an error instead.
                    drop(out_w);
                    return;
                }
                let _ = out_w.write_all(&input.to_ascii_uppercase()).await;
            });
            let out: batchdb::runner::Reader = Box::pin(FailOnFail {
                inner: out_r,
                seen: false,
            });
            Ok((Box::pin(stdin_w), out))
        },
    ))
}

/// Turns an empty output into an error (the fake runner's "failure").
struct FailOnFail<R> {
    inner: R,
    seen: bool,
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for FailOnFail<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.inner).poll_read(cx, buf) {
            std::task::Poll::Ready(Ok(())) if buf.filled().len() == before && !this.seen => {
                std::task::Poll::Ready(Err(std::io::Error::other("runner crashed")))
            }
            std::task::Poll::Ready(Ok(())) => {
                this.seen = true;
                std::task::Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

pub async fn fake_runner_like_the_seed(b: &Backend) {
    let db = b.db();
    let events = db.subscribe().await.unwrap();
    let i1 = db
        .add(&b"sleep 5; date"[..], &PushOptions::default())
        .await
        .unwrap();
    let i2 = db
        .add(&b"sleep 5; date"[..], &PushOptions::default())
        .await
        .unwrap();
    assert_eq!(
        i1.job.to_hex(),
        "ce6cc4e7fcb4a902f7c836cb93a32ae02cb47679c86e3d99c811233bf6f258c0"
    );
    assert_eq!(i1.job, i2.job);
    let reports = drain(&db, fake_runner()).await;
    assert_eq!(reports.len(), 2);
    let want = Hash::of(b"SLEEP 5; DATE");
    for r in &reports {
        assert_eq!(r.finished, Some(Finished::Result));
        assert_eq!(r.report.stdout.map(|b| b.hash), Some(want));
    }
    assert_eq!(read(&db, &want).await, b"SLEEP 5; DATE");
    assert_eq!(
        read(&db, &i1.job).await,
        b"sleep 5; date",
        "payload readable by its key"
    );
    let results = rows(&db, ListKind::Result).await;
    assert_eq!(results.len(), 2);
    let kinds: Vec<EventKind> = events.take(7).map(|e| e.unwrap().event).collect().await;
    use EventKind::*;
    assert_eq!(&kinds[..3], [Create, Push, Push]);
    assert_eq!(kinds.iter().filter(|k| **k == Start).count(), 2);
    assert_eq!(kinds.iter().filter(|k| **k == Result).count(), 2);
}

pub async fn failing_job_does_not_stall_the_queue(b: &Backend) {
    let db = b.db();
    let bad = db.add(&b"fail"[..], &PushOptions::default()).await.unwrap();
    let good = db.add(&b"ok"[..], &PushOptions::default()).await.unwrap();
    let bad2 = db.add(&b"fail"[..], &PushOptions::default()).await.unwrap();
    let reports = drain(&db, fake_runner()).await;
    assert_eq!(reports.len(), 3);
    let fails = rows(&db, ListKind::Fail).await;
    let ids: Vec<i64> = fails.iter().map(ListRow::cursor).collect();
    assert_eq!(ids, [bad.id, bad2.id]);
    let ListRow::Fail(f) = &fails[0] else {
        panic!()
    };
    assert!(
        f.value.message.contains("runner crashed"),
        "{}",
        f.value.message
    );
    let results = rows(&db, ListKind::Result).await;
    assert_eq!(
        results.iter().map(ListRow::cursor).collect::<Vec<_>>(),
        [good.id]
    );
}

pub async fn result_event_only_after_blob_is_readable(b: &Backend) {
    let db = b.db();
    let mut events = Box::pin(db.subscribe().await.unwrap());
    for n in 0..5 {
        db.add(format!("echo {n}").as_bytes(), &PushOptions::default())
            .await
            .unwrap();
    }
    let checker = {
        let db = db.clone();
        tokio::spawn(async move {
            let mut seen = 0;
            while seen < 5 {
                let ev = events.next().await.unwrap().unwrap();
                if ev.event == EventKind::Result {
                    let h: Hash = serde_json::from_value(ev.data["hash"].clone()).unwrap();
                    // The blob must be complete and readable the moment the event exists.
                    let mut v = Vec::new();
                    db.get(&h).await.unwrap().read_to_end(&mut v).await.unwrap();
                    assert_eq!(Hash::of(&v), h);
                    seen += 1;
                }
            }
        })
    };
    drain(&db, Arc::new(ShellRunner::default())).await;
    tokio::time::timeout(Duration::from_secs(30), checker)
        .await
        .unwrap()
        .unwrap();
}

pub async fn shell_runner_keeps_stdout_stderr_and_exit_code(b: &Backend) {
    let db = b.db();
    let ok = db
        .add(&b"echo out; echo err >&2"[..], &PushOptions::default())
        .await
        .unwrap();
    let bad = db
        .add(
            &b"echo partial; echo oops >&2; exit 4"[..],
            &PushOptions::default(),
        )
        .await
        .unwrap();
    let env = db
        .add(
            &b"echo $BATCHDB_JOB $BATCHDB_INSTANCE"[..],
            &PushOptions::default(),
        )
        .await
        .unwrap();
    drain(&db, Arc::new(ShellRunner::default())).await;
    let d = db.instance(ok.id).await.unwrap();
    let a = d.last_attempt().unwrap();
    assert_eq!(a.report.exit_code, Some(0));
    assert_eq!(read(&db, &a.report.stdout.unwrap().hash).await, b"out\n");
    assert_eq!(read(&db, &a.report.stderr.unwrap().hash).await, b"err\n");
    let d = db.instance(bad.id).await.unwrap();
    let a = d.last_attempt().unwrap();
    assert_eq!(a.report.exit_code, Some(4));
    assert_eq!(a.report.message.as_deref(), Some("exit code 4"));
    assert_eq!(
        read(&db, &a.report.stdout.unwrap().hash).await,
        b"partial\n"
    );
    assert_eq!(read(&db, &a.report.stderr.unwrap().hash).await, b"oops\n");
    // What each attempt used is recorded and read back (peak memory of a shell: a
    // few hundred KiB at least).
    let usage = a.report.usage.expect("usage recorded");
    assert!(usage.max_rss > 100 << 10, "{usage:?}");
    let d = db.instance(env.id).await.unwrap();
    let out = read(&db, &d.last_attempt().unwrap().report.stdout.unwrap().hash).await;
    assert_eq!(
        String::from_utf8(out).unwrap(),
        format!("{} {}\n", env.job, env.id)
    );
}

pub async fn add_while_run_is_picked_up(b: &Backend) {
    let db = b.db();
    let worker = db.worker(Arc::new(ShellRunner::default()), WorkerOptions::default());
    let stop = worker.shutdown_handle();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(worker.run(Some(tx)));
    // Another handle on the same queue, as another process would have.
    let other = BatchDb::new((b.reopen)().await, b.blobs.clone());
    for n in 0..3 {
        let inst = other
            .add(format!("echo late {n}").as_bytes(), &PushOptions::default())
            .await
            .unwrap();
        let rep = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rep.instance, inst.id);
        assert_eq!(rep.finished, Some(Finished::Result));
    }
    stop.graceful();
    task.await.unwrap().unwrap();
}

pub async fn model_invariants(b: &Backend) {
    crate::model::run(b).await;
}

pub async fn verify_reports_missing_blobs(b: &Backend) {
    let db = b.db();
    // Payloads too large to be kept inline: they are blobs in the store.
    let pad = "#".repeat(batchdb::INLINE_MAX);
    db.add(
        format!("echo fine {pad}").as_bytes(),
        &PushOptions::default(),
    )
    .await
    .unwrap();
    let gone = db
        .add(
            format!("echo gone {pad}").as_bytes(),
            &PushOptions::default(),
        )
        .await
        .unwrap();
    drain(&db, Arc::new(ShellRunner::default())).await;
    let mut problems = Vec::new();
    let sum = db.verify(|p| problems.push(p)).await.unwrap();
    assert_eq!(sum.problems, 0, "{problems:?}");
    assert_eq!(
        sum.references, 2,
        "2 payloads (the small outputs are kept inline): {sum:?}"
    );
    assert!(b.blobs.delete(&gone.job).await.unwrap());
    let sum = db.verify(|p| problems.push(p)).await.unwrap();
    assert_eq!(sum.problems, 1);
    assert_eq!(
        problems,
        [batchdb::integrity::Problem::Missing {
            hash: gone.job,
            owner: format!("job {}", gone.job)
        }]
    );
}

pub async fn gc_removes_only_old_unreferenced_blobs(b: &Backend) {
    use batchdb::integrity::GcOptions;
    let db = b.db();
    let pad = "#".repeat(batchdb::INLINE_MAX);
    let kept = db
        .add(
            format!("echo kept {pad}").as_bytes(),
            &PushOptions::default(),
        )
        .await
        .unwrap();
    let orphan = b.blobs.put(&mut &b"nobody names me"[..]).await.unwrap();
    // Young blobs are left alone, named or not.
    let young = GcOptions::new(Duration::from_secs(3600));
    assert_eq!(db.gc(young, |_| {}).await.unwrap().removed, 0);
    let now = {
        let mut o = GcOptions::new(Duration::ZERO);
        o.dry_run = true;
        o
    };
    let mut seen = Vec::new();
    let sum = db.gc(now, |e| seen.push(e.hash)).await.unwrap();
    assert_eq!((sum.removed, seen.clone()), (1, vec![orphan.hash]));
    assert!(
        b.blobs.contains(&orphan.hash).await.unwrap(),
        "dry run removes nothing"
    );
    let sum = db
        .gc(
            {
                let mut o = now;
                o.dry_run = false;
                o
            },
            |_| {},
        )
        .await
        .unwrap();
    assert_eq!((sum.removed, sum.bytes), (1, orphan.size));
    assert!(!b.blobs.contains(&orphan.hash).await.unwrap());
    assert!(b.blobs.contains(&kept.job).await.unwrap());
}

pub async fn small_payloads_live_inline_and_large_ones_in_the_store(b: &Backend) {
    let db = b.db();
    let small = db
        .add(&b"echo small"[..], &PushOptions::default())
        .await
        .unwrap();
    let big_payload = format!("echo big {}", "#".repeat(batchdb::INLINE_MAX));
    let big = db
        .add(big_payload.as_bytes(), &PushOptions::default())
        .await
        .unwrap();
    assert!(
        !b.blobs.contains(&small.job).await.unwrap(),
        "no blob for it"
    );
    assert_eq!(
        b.queue.inline_blob(&small.job).await.unwrap().as_deref(),
        Some(&b"echo small"[..])
    );
    assert!(b.blobs.contains(&big.job).await.unwrap());
    assert_eq!(b.queue.inline_blob(&big.job).await.unwrap(), None);
    assert_eq!(read(&db, &small.job).await, b"echo small");
    assert_eq!(read(&db, &big.job).await, big_payload.as_bytes());
    let mut part = Vec::new();
    db.get_range(&small.job, 5..100)
        .await
        .unwrap()
        .read_to_end(&mut part)
        .await
        .unwrap();
    assert_eq!(part, b"small");
    let (key, new) = db.create(&b"echo small"[..]).await.unwrap();
    assert_eq!((key, new), (small.job, false));
    let reports = drain(&db, Arc::new(ShellRunner::default())).await;
    assert_eq!(reports.len(), 2);
    for r in rows(&db, ListKind::Result).await {
        let ListRow::Result(r) = r else { panic!() };
        let out = read(&db, &r.value.hash).await;
        assert!(out == b"small\n" || out == b"big\n", "{out:?}");
    }
    let mut problems = Vec::new();
    db.verify(|p| problems.push(p)).await.unwrap();
    assert!(problems.is_empty(), "{problems:?}");
}

pub async fn small_outputs_live_inline_and_large_ones_in_the_store(b: &Backend) {
    let db = b.db();
    let max = batchdb::INLINE_MAX;
    // stdout of exactly INLINE_MAX bytes (inline), one byte more (a blob), and a
    // small stderr beside a large stdout.
    let at_max = db
        .add(
            format!("head -c {max} /dev/zero").as_bytes(),
            &PushOptions::default(),
        )
        .await
        .unwrap();
    let over = db
        .add(
            format!("head -c {} /dev/zero", max + 1).as_bytes(),
            &PushOptions::default(),
        )
        .await
        .unwrap();
    let mixed = db
        .add(
            &b"head -c 100000 /dev/zero; echo oops >&2; exit 3"[..],
            &PushOptions::default(),
        )
        .await
        .unwrap();
    let reports = drain(&db, Arc::new(ShellRunner::default())).await;
    assert_eq!(reports.len(), 3);
    let report = |job: &Hash| {
        reports
            .iter()
            .find(|r| r.job == *job)
            .map(|r| r.report.clone())
            .unwrap()
    };
    let small = report(&at_max.job).stdout.unwrap();
    assert_eq!(small.size, max as u64);
    assert!(
        !b.blobs.contains(&small.hash).await.unwrap(),
        "no blob for it"
    );
    assert_eq!(
        b.queue
            .inline_blob(&small.hash)
            .await
            .unwrap()
            .map(|v| v.len()),
        Some(max)
    );
    assert_eq!(read(&db, &small.hash).await, vec![0u8; max]);
    assert_eq!(db.blob_size(&small.hash).await.unwrap(), max as u64);
    let big = report(&over.job).stdout.unwrap();
    assert_eq!(big.size, max as u64 + 1);
    assert!(b.blobs.contains(&big.hash).await.unwrap());
    assert_eq!(b.queue.inline_blob(&big.hash).await.unwrap(), None);
    assert_eq!(read(&db, &big.hash).await, vec![0u8; max + 1]);
    let m = report(&mixed.job);
    assert_eq!(m.exit_code, Some(3));
    let (out, err) = (m.stdout.unwrap(), m.stderr.unwrap());
    assert!(b.blobs.contains(&out.hash).await.unwrap());
    assert!(!b.blobs.contains(&err.hash).await.unwrap());
    assert_eq!(read(&db, &err.hash).await, b"oops\n");
    assert_eq!(read(&db, &out.hash).await.len(), 100_000);
    // The failure row names both, readable.
    let fails = rows(&db, ListKind::Fail).await;
    let [ListRow::Fail(f)] = &fails[..] else {
        panic!("{fails:?}")
    };
    assert_eq!(f.value.stderr, Some(err.hash));
    // verify checks inline bytes and does not look for them in the store; gc keeps
    // every blob a row names.
    let mut problems = Vec::new();
    let sum = db.verify(|p| problems.push(p)).await.unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    assert!(sum.references >= 2, "{sum:?}");
    let gc = db
        .gc(batchdb::integrity::GcOptions::new(Duration::ZERO), |_| {})
        .await
        .unwrap();
    assert_eq!(gc.removed, 0, "{gc:?}");
    assert_eq!(read(&db, &big.hash).await.len(), max + 1);
}

pub async fn add_many_queues_every_payload_in_one_go(b: &Backend) {
    let db = b.db();
    let mut payloads: Vec<Vec<u8>> = (0..300).map(|i| format!("echo {i}").into_bytes()).collect();
    payloads.push(format!("echo big {}", "#".repeat(batchdb::INLINE_MAX)).into_bytes());
    payloads.push(b"echo 7".to_vec()); // a job added twice gets two instances
    let added = db
        .add_many(payloads.clone(), &PushOptions::default())
        .await
        .unwrap();
    assert_eq!(added.len(), payloads.len());
    for (inst, p) in added.iter().zip(&payloads) {
        assert_eq!(inst.job, Hash::of(p));
    }
    assert!(
        added
            .windows(2)
            .all(|w| w[0].id < w[1].id && w[0].created < w[1].created)
    );
    assert_eq!(db.counts().await.unwrap().pending, payloads.len() as u64);
    assert_eq!(rows(&db, ListKind::Job).await.len(), payloads.len() - 1);
    // Each new job's create event comes just before its instance's push; a job
    // added again has only the push.
    let kinds: Vec<EventKind> = db
        .events(0, false)
        .map(|e| e.unwrap().event)
        .collect()
        .await;
    let mut want = [EventKind::Create, EventKind::Push].repeat(payloads.len() - 1);
    want.push(EventKind::Push);
    assert_eq!(kinds, want);
    // The next add's instances come after every one of this add's.
    let more = db
        .add_many(
            vec![b"echo 7".to_vec(), b"echo 8".to_vec()],
            &PushOptions::default(),
        )
        .await
        .unwrap();
    let last = added.last().unwrap();
    assert!(more[0].created > last.created && more[1].created > more[0].created);
    let reports = drain(&db, Arc::new(ShellRunner::default())).await;
    assert_eq!(reports.len(), payloads.len() + 2);
    assert_eq!(db.counts().await.unwrap().result, payloads.len() as u64 + 2);
}

/// A bulk add of several chunks (each fills at `CHUNK_BYTES` of inline payloads)
/// reports every instance exactly once, in push order, some of them while later
/// payloads are still being pushed (the commits overlap the staging).
pub async fn bulk_add_over_several_chunks_reports_each_instance_once_in_order(b: &Backend) {
    let db = b.db();
    let per_chunk = batchdb::CHUNK_BYTES / batchdb::INLINE_MAX;
    let n = 2 * per_chunk + 7;
    let payload = |i: usize| {
        let mut p = format!("echo {i} ").into_bytes();
        p.resize(batchdb::INLINE_MAX, b'#');
        p
    };
    let mut bulk = db.bulk(&PushOptions::default());
    let (mut reported, mut early) = (Vec::new(), 0);
    for i in 0..n {
        let done = bulk.push(&payload(i)[..]).await.unwrap();
        if i + 1 < n {
            early += done.len();
        }
        reported.extend(done);
    }
    reported.extend(bulk.finish().await.unwrap());
    assert_eq!(reported.len(), n);
    assert!(
        early >= per_chunk,
        "only {early} reported before the last push"
    );
    for (i, inst) in reported.iter().enumerate() {
        assert_eq!(inst.job, Hash::of(&payload(i)), "instance {i}");
    }
    assert!(reported.windows(2).all(|w| w[0].created < w[1].created));
    assert_eq!(db.counts().await.unwrap().pending, n as u64);
}

pub async fn a_large_output_mirrored_live_is_stored_whole_and_its_live_file_removed(b: &Backend) {
    // Where the store can keep a local file, the live file becomes the blob; where it
    // cannot, the bytes are put. Either way the stored output is whole and the live
    // directory is left empty.
    let db = b.db();
    let live = tempfile::tempdir().unwrap();
    let job = &b"seq 200000; seq 6000 >&2"[..];
    let added = db.add(job, &PushOptions::default()).await.unwrap();
    let mut opts = WorkerOptions::default();
    opts.live_dir = Some(live.path().to_path_buf());
    let reports = drain_with(&db, Arc::new(ShellRunner::default()), opts).await;
    let [r] = &reports[..] else {
        panic!("{reports:?}")
    };
    assert_eq!(r.job, added.job);
    assert_eq!(r.report.exit_code, Some(0), "{:?}", r.report);
    let seq = |n: u32| (1..=n).map(|i| format!("{i}\n")).collect::<String>();
    let (out, err) = (r.report.stdout.unwrap(), r.report.stderr.unwrap());
    assert!(
        read(&db, &out.hash).await == seq(200_000).as_bytes(),
        "stdout"
    );
    assert!(read(&db, &err.hash).await == seq(6000).as_bytes(), "stderr");
    assert!(b.blobs.contains(&out.hash).await.unwrap());
    assert!(b.blobs.contains(&err.hash).await.unwrap());
    let left: Vec<_> = std::fs::read_dir(live.path()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

pub async fn an_empty_output_is_known_without_a_row(b: &Backend) {
    let db = b.db();
    db.add(&b"true"[..], &PushOptions::default()).await.unwrap();
    db.add(&b"echo out; exit 4"[..], &PushOptions::default())
        .await
        .unwrap();
    let reports = drain(&db, Arc::new(ShellRunner::default())).await;
    assert_eq!(reports.len(), 2);
    for r in &reports {
        assert_eq!(r.report.stderr.unwrap().hash, Hash::EMPTY, "{r:?}");
    }
    // No row holds it (only the one non-empty output has one)...
    let stored = b.raw_count("SELECT count(*) FROM inline_blobs").await;
    assert_eq!(stored, 1);
    // ...and yet it reads back, by every path, and nothing is missing.
    assert!(read(&db, &Hash::EMPTY).await.is_empty());
    assert_eq!(db.blob_size(&Hash::EMPTY).await.unwrap(), 0);
    assert_eq!(
        b.queue.inline_blob(&Hash::EMPTY).await.unwrap(),
        Some(Vec::new())
    );
    let mut problems = Vec::new();
    db.verify(|p| problems.push(p)).await.unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    let fails = rows(&db, ListKind::Fail).await;
    let [ListRow::Fail(f)] = &fails[..] else {
        panic!("{fails:?}")
    };
    assert_eq!(f.value.stderr, Some(Hash::EMPTY));
}

pub async fn an_inline_payload_comes_with_its_claim_and_a_corrupt_one_never_runs(b: &Backend) {
    let db = b.db();
    let dir = tempfile::tempdir().unwrap();
    let small = db
        .add(&b"echo small"[..], &PushOptions::default())
        .await
        .unwrap();
    let mut large = b"echo large #".to_vec();
    large.resize(batchdb::INLINE_MAX + 100, b'x');
    let large = db.add(&large[..], &PushOptions::default()).await.unwrap();
    let req = crate::util::req("w", 2, Duration::from_secs(30));
    let claims = b.queue.claim(&req).await.unwrap();
    assert_eq!(claims.len(), 2);
    for c in &claims {
        if c.job == small.job {
            assert_eq!(c.payload.as_deref(), Some(&b"echo small"[..]));
        } else {
            assert_eq!(c.job, large.job);
            assert_eq!(
                c.payload, None,
                "in the blob store, not read with the claim"
            );
        }
    }
    // A payload whose bytes no longer hash to its job fails its attempt unrun.
    let ran = dir.path().join("ran");
    let job = format!("touch {}", ran.display());
    let bad = db
        .add(job.as_bytes(), &PushOptions::default())
        .await
        .unwrap();
    let other = format!("touch {}.other", ran.display());
    let hex: String = other.bytes().map(|c| format!("{c:02x}")).collect();
    let bytes = if b.spec.db.starts_with("postgres") {
        format!("'\\x{hex}'::bytea")
    } else {
        format!("X'{hex}'")
    };
    (b.raw_sql)(format!(
        "UPDATE jobs SET payload = {bytes} WHERE key = '{}'",
        bad.job
    ))
    .await;
    // The two claimed above are still running under "w": only the third is due.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let worker = db.worker(Arc::new(ShellRunner::default()), WorkerOptions::default());
    let task = tokio::spawn(async move { worker.run(Some(tx)).await });
    let run = tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("a report in time")
        .expect("a report");
    task.abort();
    assert_eq!(run.job, bad.job);
    let msg = run.report.message.clone().unwrap_or_default();
    assert!(msg.contains("payload") && msg.contains("corrupt"), "{msg}");
    assert!(
        !ran.exists() && !dir.path().join("ran.other").exists(),
        "never ran"
    );
}
