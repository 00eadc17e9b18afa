//! Model-based test: random sequences of add / claim / heartbeat / expire / finish /
//! cancel / retry against a queue, checking after every step the queue's invariants:
//! 1. every pushed instance is pending, running, or in exactly one terminal row;
//! 2. no instance is handed to a second worker while the first holds a valid lease,
//!    and a superseded attempt can never record anything (fencing);
//! 3. terminal states never change, and each has exactly one terminal event.
//!
//! Sequences are drawn from fixed seeds so that a failure names a reproducible seed.

use std::collections::HashMap;
use std::time::Duration;

use batchdb::Error;
use batchdb::queue::{
    AttemptReport, ClaimToken, EventKind, Finished, ListKind, Outcome, Selector, State,
};

use crate::Backend;
use crate::util::{job, now_ms, opts, req};

const SEEDS: u64 = 12;
const STEPS: usize = 60;
const SHORT: Duration = Duration::from_millis(30);
const LONG: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Pending,
    /// Running under this token, whose lease is valid at least until this time.
    Running {
        token: i64,
        valid_until: i64,
    },
    Terminal(State),
}

#[derive(Default)]
struct Model {
    expect: HashMap<i64, Expect>,
    cancel_requested: HashMap<i64, bool>,
    /// Every token ever handed out, with the instance.
    held: Vec<ClaimToken>,
    log: Vec<String>,
}

pub async fn run(b: &Backend) {
    for seed in 0..SEEDS {
        // Each seed starts from a fresh queue namespace: use distinct job numbers.
        let mut m = Model::default();
        let mut rng = fastrand::Rng::with_seed(seed);
        for step in 0..STEPS {
            let op = rng.u8(0..100);
            let what = step_once(b, &mut m, &mut rng, op, seed).await;
            m.log.push(what);
            check(b, &m, seed, step).await;
        }
        // Settle everything still alive so the next seed starts clean.
        let live: Vec<i64> = m
            .expect
            .iter()
            .filter(|(_, e)| !matches!(e, Expect::Terminal(_)))
            .map(|(id, _)| *id)
            .collect();
        for id in live {
            b.queue.cancel(&Selector::Id(id)).await.unwrap();
            if let Some(Expect::Running { token, .. }) = m.expect.get(&id) {
                let t = ClaimToken { id, token: *token };
                b.queue
                    .finish(&t, &Outcome::Cancelled(AttemptReport::default()))
                    .await
                    .unwrap();
            }
        }
        check_events(b).await;
    }
}

fn fail(m: &Model, seed: u64, msg: String) -> ! {
    panic!("seed {seed}: {msg}\nops:\n  {}", m.log.join("\n  "));
}

async fn step_once(
    b: &Backend,
    m: &mut Model,
    rng: &mut fastrand::Rng,
    op: u8,
    seed: u64,
) -> String {
    match op {
        0..=24 => {
            let inst = b
                .queue
                .add(&job(seed * 100 + rng.u64(0..3)), &opts())
                .await
                .unwrap();
            m.expect.insert(inst.id, Expect::Pending);
            format!("add -> {}", inst.id)
        }
        25..=44 => {
            let short = rng.bool();
            let lease = if short { SHORT } else { LONG };
            let before = now_ms();
            let claims = b
                .queue
                .claim(&req(&format!("w{}", rng.u8(0..3)), rng.usize(1..3), lease))
                .await
                .unwrap();
            let after = now_ms();
            for c in &claims {
                match m.expect.get(&c.token.id).copied() {
                    Some(Expect::Pending) => {}
                    Some(Expect::Running { valid_until, .. }) if after >= valid_until => {}
                    other => fail(
                        m,
                        seed,
                        format!("claimed {} while {other:?} (at {after})", c.token.id),
                    ),
                }
                m.expect.insert(
                    c.token.id,
                    Expect::Running {
                        token: c.token.token,
                        valid_until: before + lease.as_millis() as i64,
                    },
                );
                m.held.push(c.token);
            }
            // A claim ends an expired instance instead of taking it over when its
            // cancel was requested (cancelled) or its worker was lost MAX_LOST times
            // (fail).
            for (id, e) in m.expect.iter_mut() {
                if let Expect::Running { valid_until, .. } = *e {
                    if after >= valid_until {
                        let d = b.queue.instance(*id).await.unwrap();
                        let lost = d
                            .attempts
                            .iter()
                            .filter(|a| a.outcome.as_deref() == Some("lost"))
                            .count();
                        let gave_up = d
                            .last_attempt()
                            .and_then(|a| a.report.message.clone())
                            .unwrap_or_default();
                        if d.state == State::Cancelled && m.cancel_requested.get(id) == Some(&true)
                        {
                            *e = Expect::Terminal(State::Cancelled);
                        } else if d.state == State::Fail
                            && lost as i64 + 1 >= batchdb::queue::MAX_LOST
                            && gave_up.contains("worker lost")
                        {
                            *e = Expect::Terminal(State::Fail);
                        }
                    }
                }
            }
            format!(
                "claim {} lease {lease:?} -> {:?}",
                claims.len(),
                claims.iter().map(|c| c.token).collect::<Vec<_>>()
            )
        }
        45..=54 if !m.held.is_empty() => {
            let t = m.held[rng.usize(0..m.held.len())];
            let before = now_ms();
            let r = b.queue.heartbeat(&t, SHORT).await;
            let current = matches!(m.expect.get(&t.id), Some(Expect::Running { token, .. }) if *token == t.token);
            match (&r, current) {
                (Ok(_), true) => {
                    if let Some(Expect::Running { valid_until, .. }) = m.expect.get_mut(&t.id) {
                        // The heartbeat replaced the lease: it is valid at least this long.
                        *valid_until = before + SHORT.as_millis() as i64;
                    }
                }
                (Err(Error::Fenced { .. }), false) => {}
                // The lease may have expired and been reclaimed by nobody: still current.
                _ => fail(
                    m,
                    seed,
                    format!("heartbeat {t:?} current={current} -> {r:?}"),
                ),
            }
            format!("heartbeat {t:?} -> {}", r.is_ok())
        }
        55..=74 if !m.held.is_empty() => {
            let t = m.held[rng.usize(0..m.held.len())];
            let report = {
                let mut o = AttemptReport::default();
                o.end = now_ms();
                o.stdout = Some(job(999));
                o
            };
            let (outcome, expect) = match rng.u8(0..5) {
                0 | 1 => (Outcome::Success(report), Expect::Terminal(State::Result)),
                2 => (
                    Outcome::Failure {
                        report,
                        retry_at: None,
                    },
                    Expect::Terminal(State::Fail),
                ),
                3 => (
                    Outcome::Failure {
                        report,
                        retry_at: Some(now_ms()),
                    },
                    Expect::Pending,
                ),
                _ => (Outcome::Released(report), Expect::Pending),
            };
            let r = b.queue.finish(&t, &outcome).await;
            let current = matches!(m.expect.get(&t.id), Some(Expect::Running { token, .. }) if *token == t.token);
            match (&r, current) {
                (Ok(f), true) => {
                    // A requested cancel turns a retry or a release into a cancellation.
                    let cancelled = m.cancel_requested.get(&t.id) == Some(&true);
                    let expect = match expect {
                        Expect::Pending if cancelled => Expect::Terminal(State::Cancelled),
                        e => e,
                    };
                    let ok = matches!(
                        (f, expect),
                        (Finished::Result, Expect::Terminal(State::Result))
                            | (Finished::Fail, Expect::Terminal(State::Fail))
                            | (Finished::Cancelled, Expect::Terminal(State::Cancelled))
                            | (Finished::Retry(_) | Finished::Released, Expect::Pending)
                    );
                    if !ok {
                        fail(
                            m,
                            seed,
                            format!("finish {t:?} -> {f:?}, expected {expect:?}"),
                        );
                    }
                    m.expect.insert(t.id, expect);
                    m.cancel_requested.remove(&t.id);
                }
                (Err(Error::Fenced { .. }), false) => {}
                _ => fail(m, seed, format!("finish {t:?} current={current} -> {r:?}")),
            }
            format!("finish {t:?} -> {r:?}")
        }
        75..=84 if !m.expect.is_empty() => {
            let ids: Vec<i64> = m.expect.keys().copied().collect();
            let id = ids[rng.usize(0..ids.len())];
            let r = b.queue.cancel(&Selector::Id(id)).await.unwrap();
            match m.expect.get(&id).copied() {
                Some(Expect::Pending) => {
                    assert_eq!(r.len(), 1);
                    m.expect.insert(id, Expect::Terminal(State::Cancelled));
                }
                Some(Expect::Running { .. }) => {
                    assert_eq!(r.len(), 1);
                    m.cancel_requested.insert(id, true);
                }
                _ => assert!(r.is_empty(), "cancel of a terminal instance did something"),
            }
            format!("cancel {id}")
        }
        85..=89 => {
            let pushed = b.queue.retry(&Selector::AllFailed, false).await.unwrap();
            for i in &pushed {
                m.expect.insert(i.id, Expect::Pending);
            }
            format!("retry all failed -> {}", pushed.len())
        }
        _ => {
            tokio::time::sleep(SHORT + Duration::from_millis(5)).await;
            "sleep past short leases".into()
        }
    }
}

async fn check(b: &Backend, m: &Model, seed: u64, step: usize) {
    for (id, e) in &m.expect {
        let d = b.queue.instance(*id).await.unwrap();
        let ok = match e {
            Expect::Pending => d.state == State::Pending,
            Expect::Running { token, .. } => {
                d.state == State::Running && d.attempts.last().map(|a| a.attempt) == Some(*token)
            }
            Expect::Terminal(s) => d.state == *s,
        };
        if !ok {
            fail(
                m,
                seed,
                format!(
                    "step {step}: instance {id} is {:?}, model says {e:?}",
                    d.state
                ),
            );
        }
    }
    // Invariant 1: the lists partition the instances.
    let c = b.queue.counts().await.unwrap();
    let mut listed = 0;
    for kind in [
        ListKind::Pending,
        ListKind::Result,
        ListKind::Fail,
        ListKind::Cancelled,
    ] {
        let mut after = 0;
        loop {
            let page = b.queue.list_page(kind, (after, 500), None).await.unwrap();
            let Some(last) = page.last() else { break };
            after = last.cursor();
            listed += page.len() as u64;
        }
    }
    let total = c.pending + c.running + c.result + c.fail + c.cancelled;
    if listed != total {
        fail(
            m,
            seed,
            format!("step {step}: lists hold {listed} rows, counts say {total}"),
        );
    }
}

async fn check_events(b: &Backend) {
    let mut terminal: HashMap<i64, usize> = HashMap::new();
    let mut after = 0;
    loop {
        let evs = b.queue.events(after, 1000).await.unwrap();
        let Some(last) = evs.last() else { break };
        after = last.id;
        for e in evs {
            if matches!(
                e.event,
                EventKind::Result | EventKind::Fail | EventKind::Cancel
            ) {
                *terminal.entry(e.instance.unwrap()).or_default() += 1;
            }
        }
    }
    for (id, n) in terminal {
        assert_eq!(n, 1, "instance {id} has {n} terminal events");
        let s = b.queue.instance(id).await.unwrap().state;
        assert!(
            matches!(s, State::Result | State::Fail | State::Cancelled),
            "instance {id} is {s:?}"
        );
    }
}
