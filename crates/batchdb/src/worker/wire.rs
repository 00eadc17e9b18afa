//! The worker endpoints' request and reply bodies (JSON), shared by `batchdb serve`
//! and the remote port, and the protocol version both check. Routes, below the
//! server's prefix: `GET /worker/hello` ([`Hello`]), `POST /worker/claim`
//! ([`ClaimRequest`] → [`Claimed`]), `POST /worker/wait` ([`Wait`] → [`Seq`]: a long
//! poll that returns once the server's change counter differs from `seen`),
//! `POST /worker/heartbeat` ([`Beat`]), `POST /worker/status` and
//! `POST /worker/recorded` ([`ClaimToken`]), `POST /worker/finish` ([`Finish`]),
//! `POST /worker/finish-claim` ([`FinishClaim`] → [`FinishedClaimed`]; a server that
//! answers it says so in its [`Hello`]),
//! `GET /worker/blob/{hash}`, `POST /worker/output/{id}/{attempt}` (the bytes →
//! [`BlobInfo`]),
//! `POST /worker/live/{id}/{attempt}/{stdout|stderr}` (the bytes as they come),
//! `POST /worker/deps` ([`Deps`]), `POST /worker/idle` ([`Resources`]),
//! `GET /worker/counts`, `POST /worker/seen` ([`Seen`]), `POST /worker/gone`
//! ([`Gone`]).

use serde::{Deserialize, Serialize};

#[cfg(doc)]
use crate::blob::BlobInfo;
use crate::queue::{AttemptReport, Claim, ClaimRequest, ClaimToken, Finished, Outcome, Resources};

/// The worker protocol this build speaks; a worker and a server that differ refuse
/// each other with a message naming both.
pub const PROTOCOL: u32 = 1;

/// The request header that carries a worker's [`PROTOCOL`].
pub const PROTOCOL_HEADER: &str = "batchdb-worker-protocol";

/// What `GET /worker/hello` answers: the server's version and protocol.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// The server's batchdb version.
    pub version: String,
    /// Its worker protocol ([`PROTOCOL`]).
    pub protocol: u32,
    /// Whether it answers `POST /worker/finish-claim` (a server from before that
    /// endpoint leaves it out: the worker then finishes and claims in two calls).
    #[serde(default)]
    pub finish_claim: bool,
}

/// A claim's reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claimed {
    /// What was claimed.
    pub claims: Vec<Claim>,
    /// For each claim to run, in order, its payload (hex) if the queue keeps it
    /// inline (at most [`crate::INLINE_MAX`] bytes): it then needs no request of its
    /// own. The worker checks it against the job key like any payload.
    #[serde(default)]
    pub payloads: Vec<Option<String>>,
}

/// Wait until the server's change counter differs from `seen` (it moved on, or the
/// server restarted), or `timeout_ms` passed.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Wait {
    /// The counter the worker last saw.
    pub seen: u64,
    /// The longest wait, in ms (the server caps it at 30 s).
    pub timeout_ms: u64,
}

/// The server's change counter.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Seq {
    /// Its value now.
    pub seq: u64,
}

/// Renew attempt `token`'s lease by `lease_ms` from now.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Beat {
    /// The attempt.
    pub token: ClaimToken,
    /// The new lease, in ms.
    pub lease_ms: u64,
}

/// End attempt `token` with `outcome`. The outputs kept inline (at most
/// [`crate::INLINE_MAX`] bytes each) travel beside it, hex-encoded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Finish {
    /// The attempt.
    pub token: ClaimToken,
    /// How it ended.
    pub outcome: Outcome,
    /// Its inline outputs, hex.
    pub inline: Vec<String>,
}

/// End an attempt as [`Finish`] does, then claim with `next` in the same transaction
/// (see [`WorkerPort::finish_and_claim`](super::WorkerPort::finish_and_claim)).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinishClaim {
    /// The finish.
    pub finish: Finish,
    /// The claim made after it.
    pub next: ClaimRequest,
}

/// The reply to a [`FinishClaim`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinishedClaimed {
    /// What became of the finished instance.
    pub finished: Finished,
    /// What the claim took, as a claim's reply.
    pub claimed: Claimed,
}

fn report_mut(outcome: &mut Outcome) -> &mut AttemptReport {
    match outcome {
        Outcome::Success(r) | Outcome::Cancelled(r) | Outcome::Released(r) => r,
        Outcome::Failure { report, .. } => report,
    }
}

impl Finish {
    /// The body that ends `token` with `outcome`, its inline outputs included.
    pub fn new(token: ClaimToken, outcome: &Outcome) -> Finish {
        let mut outcome = outcome.clone();
        let report = report_mut(&mut outcome);
        let inline = report.inline.iter().map(hex::encode).collect();
        report.inline.clear();
        Finish {
            token,
            outcome,
            inline,
        }
    }

    /// The outcome with its inline outputs back in place; an error says what is
    /// wrong with them (not hex, longer than [`crate::INLINE_MAX`]).
    pub fn into_outcome(self) -> Result<Outcome, String> {
        let mut outcome = self.outcome;
        let report = report_mut(&mut outcome);
        for (i, h) in self.inline.iter().enumerate() {
            if h.len() > 2 * crate::INLINE_MAX {
                return Err(format!(
                    "inline output {i} is longer than {} bytes",
                    crate::INLINE_MAX
                ));
            }
            let bytes = hex::decode(h).map_err(|e| format!("inline output {i}: {e}"))?;
            report.keep_inline(bytes);
        }
        Ok(outcome)
    }
}

/// A page of instance `id`'s dependency results.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Deps {
    /// The dependent instance.
    pub id: i64,
    /// Instance ids above this.
    pub after: i64,
    /// At most this many (the server caps it at 4,096).
    pub limit: usize,
}

/// Worker `name` is alive with `resources`, for `ttl_ms`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Seen {
    /// The worker's name.
    pub name: String,
    /// What it has in all.
    pub resources: Resources,
    /// How long the entry lasts, in ms.
    pub ttl_ms: u64,
}

/// Worker `name` stopped.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Gone {
    /// The worker's name.
    pub name: String,
}
