//! The queue's rules, table by table.

use std::time::Duration;

use super::*;
use crate::blob::BlobInfo;
use crate::queue::CacheSpec;

const T: ClaimToken = ClaimToken { id: 7, token: 2 };

fn report(cached: bool) -> AttemptReport {
    AttemptReport {
        start: 1,
        end: 2,
        exit_code: Some(0),
        stdout: Some(BlobInfo {
            hash: Hash::of(b"out"),
            size: 3,
        }),
        cached,
        cache_key: Some(Hash::of(b"key")),
        ..AttemptReport::default()
    }
}

/// The outcomes a worker can report, by name.
fn outcomes() -> Vec<(&'static str, Outcome)> {
    vec![
        ("success", Outcome::Success(report(false))),
        ("cache hit", Outcome::Success(report(true))),
        (
            "failure, retries left",
            Outcome::Failure {
                report: report(false),
                retry_at: Some(500),
            },
        ),
        (
            "failure, no retries left",
            Outcome::Failure {
                report: report(false),
                retry_at: None,
            },
        ),
        ("cancelled", Outcome::Cancelled(report(false))),
        ("released", Outcome::Released(report(false))),
    ]
}

/// (attempt end, state, finished, counts a failure, clears cache key, fills cache, event)
type Row = (AttemptEnd, State, Finished, bool, bool, bool, EventKind);

fn expected(name: &str, cancel: bool) -> Row {
    use AttemptEnd as A;
    use EventKind as E;
    let cancelled = (
        A::Cancelled,
        State::Cancelled,
        Finished::Cancelled,
        false,
        false,
        false,
        E::Cancel,
    );
    match (name, cancel) {
        ("success", _) => (
            A::Result,
            State::Result,
            Finished::Result,
            false,
            false,
            true,
            E::Result,
        ),
        ("cache hit", _) => (
            A::Result,
            State::Result,
            Finished::Result,
            false,
            false,
            false,
            E::Result,
        ),
        ("failure, retries left", false) => (
            A::Retry,
            State::Pending,
            Finished::Retry(500),
            true,
            true,
            false,
            E::Retry,
        ),
        ("failure, no retries left", _) => (
            A::Fail,
            State::Fail,
            Finished::Fail,
            true,
            false,
            false,
            E::Fail,
        ),
        ("released", false) => (
            A::Released,
            State::Pending,
            Finished::Released,
            false,
            true,
            false,
            E::Retry,
        ),
        // A cancel requested while it ran wins over a retry or a release.
        ("failure, retries left" | "released" | "cancelled", _) => cancelled,
        _ => unreachable!("{name}"),
    }
}

#[test]
fn every_outcome_times_cancel_requested_ends_as_the_table_says() {
    for cancel in [false, true] {
        for (name, outcome) in outcomes() {
            let tr = finish(&T, &outcome, cancel);
            let got = (
                tr.attempt,
                tr.state,
                tr.finished,
                tr.counts_failure,
                tr.clears_cache_key,
                tr.fills_cache.is_some(),
                tr.event,
            );
            assert_eq!(got, expected(name, cancel), "{name}, cancel {cancel}");
            // An instance that may run again is not ended; every other one is.
            assert_eq!(tr.ends, tr.state != State::Pending, "{name}");
            assert_eq!(
                tr.run_at.is_some(),
                tr.attempt == AttemptEnd::Retry,
                "{name}"
            );
            assert_eq!(tr.data["attempt"], 2, "{name}");
        }
    }
}

#[test]
fn a_result_fills_the_cache_under_its_own_key_and_logs_its_hash() {
    let outcome = Outcome::Success(report(false));
    let tr = finish(&T, &outcome, false);
    assert_eq!(tr.fills_cache, Some(Hash::of(b"key")));
    assert_eq!(tr.data["hash"], serde_json::json!(Hash::of(b"out")));
    assert_eq!(tr.data["cached"], false);
}

#[test]
fn a_retry_is_due_when_the_worker_said() {
    let outcome = Outcome::Failure {
        report: report(false),
        retry_at: Some(1234),
    };
    let tr = finish(&T, &outcome, false);
    assert_eq!(tr.run_at, Some(1234));
    assert_eq!(tr.data["run_at"], 1234);
}

#[test]
fn an_expired_lease_is_cancelled_given_up_or_taken_over() {
    for cancel in [false, true] {
        for lost_before in 0..=MAX_LOST {
            let got = expired(99, cancel, lost_before);
            match got {
                Expired::Cancel(Outcome::Cancelled(r)) => {
                    assert!(cancel);
                    assert_eq!(r.end, 99);
                }
                Expired::GiveUp(Outcome::Failure {
                    report,
                    retry_at: None,
                }) => {
                    assert!(!cancel && lost_before + 1 >= MAX_LOST);
                    assert!(report.message.unwrap().contains("worker lost 3 times"));
                }
                Expired::TakeOver(r) => {
                    assert!(!cancel && lost_before + 1 < MAX_LOST);
                    assert_eq!(r.message.as_deref(), Some("lease expired: worker lost"));
                }
                other => panic!("cancel {cancel}, lost {lost_before}: {other:?}"),
            }
        }
    }
}

#[test]
fn a_claim_uses_the_cache_only_when_asked_and_the_runner_is_named() {
    let job = Hash::of(b"job");
    let spec = CacheSpec {
        runner: "shell:sh".into(),
        default_timeout: Some(Duration::from_secs(9)),
    };
    let req = |cache: Option<CacheSpec>, cache_all: bool| {
        let mut r = ClaimRequest::new("w", 1, Duration::from_secs(30));
        r.cache = cache;
        r.cache_all = cache_all;
        r
    };
    let none = ExecContext::default();
    let named = req(Some(spec.clone()), false);
    let nine = Some(Duration::from_secs(9));
    assert_eq!(
        claim_cache_key(&named, &job, (false, None), None, &none),
        None
    );
    assert_eq!(
        claim_cache_key(&named, &job, (true, None), None, &none),
        Some(cache_key(&job, "shell:sh", nine, None, &none))
    );
    // The instance's own timeout wins over the worker's default.
    let one = Some(Duration::from_secs(1));
    assert_eq!(
        claim_cache_key(&named, &job, (true, one), None, &none),
        Some(cache_key(&job, "shell:sh", one, None, &none))
    );
    assert!(claim_cache_key(&req(Some(spec), true), &job, (false, None), None, &none).is_some());
    assert_eq!(
        claim_cache_key(&req(None, true), &job, (true, None), None, &none),
        None
    );
    // Dependencies' results are part of the key: other inputs, another key.
    let (a, b) = (Hash::of(b"inputs a"), Hash::of(b"inputs b"));
    let with = |i| claim_cache_key(&named, &job, (true, None), Some(i), &none);
    assert_ne!(with(&a), with(&b));
    assert_ne!(
        with(&a),
        claim_cache_key(&named, &job, (true, None), None, &none)
    );
    assert_eq!(
        with(&a),
        Some(cache_key(&job, "shell:sh", nine, Some(&a), &none))
    );
    // So are the working directory and environment, not the limits.
    let mut ctx = ExecContext {
        cwd: Some("/srv".into()),
        ..ExecContext::default()
    };
    let in_srv = claim_cache_key(&named, &job, (true, None), None, &ctx);
    assert_ne!(
        in_srv,
        claim_cache_key(&named, &job, (true, None), None, &none)
    );
    ctx.limits.memory = Some(1 << 30);
    assert_eq!(
        in_srv,
        claim_cache_key(&named, &job, (true, None), None, &ctx)
    );
    ctx.env.insert("A".into(), "1".into());
    assert_ne!(
        in_srv,
        claim_cache_key(&named, &job, (true, None), None, &ctx)
    );
}

#[test]
fn a_dependency_is_met_by_a_result_or_any_end_when_asked() {
    use State::*;
    for (state, any, want) in [
        (Result, false, DepState::Met),
        (Result, true, DepState::Met),
        (Fail, false, DepState::Broken),
        (Cancelled, false, DepState::Broken),
        (Fail, true, DepState::Met),
        (Cancelled, true, DepState::Met),
        (Waiting, false, DepState::Unmet),
        (Pending, true, DepState::Unmet),
        (Running, false, DepState::Unmet),
    ] {
        assert_eq!(dependency(state, any), want, "{state:?} any={any}");
    }
    assert_eq!(initial_state(true, 3), Cancelled);
    assert_eq!(initial_state(false, 1), Waiting);
    assert_eq!(initial_state(false, 0), Pending);
    let job = Hash::of(b"dep");
    assert_eq!(
        broken_message(&job, 7, Fail),
        format!("dependency {job} 7 failed")
    );
    assert_eq!(
        broken_message(&job, 7, Cancelled),
        format!("dependency {job} 7 cancelled")
    );
}

#[test]
fn a_failure_runs_again_while_the_budget_lasts() {
    assert_eq!(retry_number(0, 0), None);
    assert_eq!(retry_number(0, 2), Some(1));
    assert_eq!(retry_number(1, 2), Some(2));
    assert_eq!(retry_number(2, 2), None);
}

#[test]
fn backoff_doubles_to_its_cap_times_the_jitter() {
    let (base, max) = (Duration::from_secs(1), Duration::from_secs(300));
    assert_eq!(backoff(base, max, 1, 1.0), Duration::from_secs(1));
    assert_eq!(backoff(base, max, 4, 1.0), Duration::from_secs(8));
    assert_eq!(backoff(base, max, 30, 1.0), max);
    assert_eq!(backoff(base, max, 2, 0.5), Duration::from_secs(1));
}

#[test]
fn attempt_ends_round_trip_through_their_names() {
    for e in AttemptEnd::ALL {
        assert_eq!(AttemptEnd::parse(e.as_str()), Some(e));
    }
    assert_eq!(AttemptEnd::parse("running"), None);
}

#[test]
fn needs_run_where_they_fit_and_a_starving_instance_reserves_what_it_needs() {
    let res = |specs: &[&str]| {
        let mut r = Resources::default();
        for s in specs {
            r.add(s).unwrap();
        }
        r
    };
    let needs = |specs: &[&str]| {
        let mut n = Needs::default();
        for s in specs {
            n.add(s).unwrap();
        }
        n
    };
    let total = res(&["gpu=0,1", "mem=16G"]);
    let one_free = res(&["gpu=1", "mem=16G"]);
    let none: BTreeSet<String> = BTreeSet::new();
    let gpu: BTreeSet<String> = ["gpu".to_string()].into();
    let (big, small) = (needs(&["gpu=2"]), needs(&["gpu=1"]));
    assert_eq!(
        fit(&Needs::default(), (&total, &one_free), &gpu, false),
        Fit::Run
    );
    assert_eq!(fit(&small, (&total, &one_free), &none, false), Fit::Run);
    assert_eq!(fit(&big, (&total, &one_free), &none, false), Fit::Skip);
    assert_eq!(fit(&big, (&total, &one_free), &none, true), Fit::Reserve);
    assert_eq!(fit(&big, (&total, &total), &none, true), Fit::Run);
    // Reserved for a larger one that waited: a small one is not claimed around it.
    assert_eq!(fit(&small, (&total, &one_free), &gpu, false), Fit::Skip);
    assert_eq!(
        fit(&needs(&["mem=1G"]), (&total, &one_free), &gpu, false),
        Fit::Run
    );
    // More than this worker could ever give: skipped, never reserved for.
    let huge = needs(&["gpu=3"]);
    assert_eq!(fit(&huge, (&total, &total), &none, true), Fit::Skip);
    assert_eq!(
        fit(&needs(&["fpga=1"]), (&total, &total), &none, true),
        Fit::Skip
    );
}
