//! The seed's `add.js`: add a job and print the `create` and `push` events.
//!
//! `cargo run -p batchdb --example add [DIR]` (default DIR: /tmp/compute)

use batchdb::queue::{EventKind, PushOptions};
use batchdb::{BatchDb, Config};
use futures_util::StreamExt;

#[tokio::main]
async fn main() -> batchdb::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/tmp/compute".into());
    let compute = BatchDb::open(&Config::in_dir(dir)).await?;
    let events = compute.subscribe().await?;
    compute
        .add(&b"sleep 5; date"[..], &PushOptions::default())
        .await?;
    // The events of this add: `create` (only the first time this payload is seen) and `push`.
    futures_util::pin_mut!(events);
    while let Some(ev) = events.next().await {
        let ev = ev?;
        match ev.event {
            EventKind::Create => println!("created {}", ev.job),
            EventKind::Push => {
                println!("pushed {} {}", ev.job, ev.created.unwrap_or_default());
                break;
            }
            _ => {}
        }
    }
    Ok(())
}
