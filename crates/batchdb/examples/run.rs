//! The seed's `run.js`: run the pending queue with a bash runner, printing each
//! result's id and bytes. Exits once the queue is empty.
//!
//! `cargo run -p batchdb --example run [DIR]` (default DIR: /tmp/compute)

use std::sync::Arc;

use batchdb::queue::Finished;
use batchdb::runner::ShellRunner;
use batchdb::worker::WorkerOptions;
use batchdb::{BatchDb, Config};
use tokio::io::AsyncWriteExt;

#[tokio::main]
async fn main() -> batchdb::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/tmp/compute".into());
    let compute = BatchDb::open(&Config::in_dir(dir)).await?;
    // The seed's run(key) spawned `bash` and piped the payload into it.
    let runner = Arc::new(ShellRunner::new("bash")?);
    let mut opts = WorkerOptions::default();
    opts.until_empty = true;
    let (tx, mut results) = tokio::sync::mpsc::unbounded_channel();
    let worker = tokio::spawn(compute.worker(runner, opts).run(Some(tx)));
    while let Some(r) = results.recv().await {
        if let (Some(Finished::Result), Some(out)) = (r.finished, r.report.stdout) {
            println!("RESULT {} {}", r.job, out.hash);
            let mut blob = compute.get(&out.hash).await?;
            let mut stdout = tokio::io::stdout();
            let _ = tokio::io::copy(&mut blob, &mut stdout).await;
            let _ = stdout.flush().await;
        }
    }
    worker
        .await
        .map_err(|e| batchdb::Error::Task(e.to_string()))?
}
