//! The seed's `pending.js`: list the pending queue.
//!
//! `cargo run -p batchdb --example pending [DIR]` (default DIR: /tmp/compute)

use batchdb::queue::ListKind;
use batchdb::{BatchDb, Config};
use futures_util::StreamExt;

#[tokio::main]
async fn main() -> batchdb::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/tmp/compute".into());
    let compute = BatchDb::open(&Config::in_dir(dir)).await?;
    let rows = compute.list(ListKind::Pending, None);
    futures_util::pin_mut!(rows);
    while let Some(row) = rows.next().await {
        println!("{}", serde_json::to_string(&row?).unwrap_or_default());
    }
    Ok(())
}
