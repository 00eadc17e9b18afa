//! One conformance suite for every backend: each test is written once, generic over a
//! [`Backend`], and instantiated for every backend by [`suite!`].
//!
//! Backend-specific tests (corrupting a file on disk, say) live in `dir_store.rs`;
//! tests of the facade and worker, end to end, live in `end_to_end.rs` (a worker's life
//! as its caller sees it in `lifecycle.rs`); the model-based test of the
//! queue's invariants lives in `model.rs`; tests that need a fresh backend pair per
//! round (`@fresh`: attempt isolation, `isolation.rs`) get its constructor.

mod ahead;
mod backends;
mod blob;
mod deps;
mod dir_store;
mod end_to_end;
mod isolation;
mod lifecycle;
mod model;
#[cfg(feature = "postgres")]
mod postgres;
mod prune;
mod queue;
mod recent;
mod resources;
#[cfg(feature = "s3")]
mod s3_store;
mod sqlite;
mod util;

pub use backends::Backend;

/// Instantiates every shared test for the named backend constructors.
macro_rules! suite {
    ($($backend:ident),* $(,)?) => {
        $(
            mod $backend {
                suite!(@tests $backend, queue: [
                    create_is_idempotent,
                    push_unknown_job_fails,
                    push_existing_job_twice_gives_two_instances,
                    concurrent_pushes_stay_distinct,
                    concurrent_writes_that_fail_undo_only_themselves,
                    created_is_unique_across_jobs,
                    add_writes_job_and_instance_together,
                    claim_order_newest_and_oldest,
                    an_attempts_usage_is_recorded_listed_and_in_its_event,
                    claim_priority_first,
                    delayed_instance_waits_for_run_at,
                    running_instance_listed_as_running,
                    concurrent_claims_never_share_an_instance,
                    expired_lease_is_taken_over_and_old_token_fenced,
                    heartbeat_keeps_a_long_job,
                    failure_retries_then_fails,
                    release_returns_to_pending,
                    cancel_pending_and_running,
                    cancel_wins_over_a_retry_or_release,
                    retry_pushes_failed_again,
                    list_streams_pages_in_order,
                    events_cover_every_transition_in_order,
                    counts_match_lists,
                    wait_change_wakes_on_another_handle,
                    result_cache_serves_and_dedupes,
                    cached_duplicates_do_not_block_the_queue,
                    a_job_whose_worker_keeps_dying_fails,
                    select_by_created_job_and_result,
                    corrupt_values_read_back_are_one_error,
                    corrupt_values_on_every_path_are_one_error,
                ]);
                suite!(@tests $backend, lifecycle: [
                    a_worker_awaited_outside_any_task_stops_when_its_future_is_dropped,
                ]);
                suite!(@tests $backend, ahead: [
                    a_slot_starts_what_it_claimed_ahead_yet_runs_one_job_at_a_time,
                    a_held_claim_is_given_back_when_the_job_before_it_runs_long,
                    a_held_claim_cancelled_ends_without_running,
                    a_stopping_worker_gives_back_its_held_claims,
                    no_claim_is_held_ahead_when_ahead_is_zero,
                ]);
                suite!(@tests $backend, deps: [
                    a_takeover_that_ends_an_instance_lets_the_same_claim_take_its_dependent,
                    a_dependency_is_released_in_the_transaction_of_its_result,
                    failure_and_cancel_propagate_down_the_graph,
                    retry_with_dependents_rewires_the_graph,
                    cycles_and_unknown_selectors_are_rejected,
                    a_waiting_instance_is_never_claimed_by_racing_workers,
                    the_cache_key_covers_the_dependency_results,
                    batches_count_and_select_their_instances,
                    wait_follows_the_log_from_another_handle,
                    a_finish_claims_the_next_instance_in_its_own_transaction,
                ]);
                suite!(@tests $backend, prune: [
                    prune_removes_ended_instances_before_the_cutoff_and_keeps_the_rest,
                    ids_are_never_given_again_after_a_prune_removed_the_newest,
                    prune_keeps_what_a_kept_instance_depends_on_then_removes_the_chain,
                    prune_removes_the_cache_entries_and_inline_outputs_only_it_referenced,
                    the_first_good_result_of_a_payload_stays_cached_until_pruned,
                ]);
                suite!(@tests $backend, recent: [
                    recent_pages_go_newest_first_and_page_by_id,
                    recent_pages_filter_by_states_and_batch,
                    recent_rows_carry_the_last_attempt,
                ]);
                suite!(@tests $backend, resources: [
                    needs_aware_claims_land_only_where_they_fit,
                    a_starving_instance_reserves_units_until_it_fits,
                    concurrency_keys_never_run_more_than_their_limit_under_racing_claims,
                    one_claim_of_several_counts_its_own_starts_against_a_keys_limit,
                    passed_over_instances_leave_their_priority_to_the_next_in_either_order,
                    a_lost_workers_concurrency_slot_passes_to_the_takeover,
                    unrunnable_counts_what_no_live_worker_has,
                ]);
                suite!(@tests $backend, blob: [
                    roundtrip_sizes,
                    identical_content_stored_once,
                    missing_blob_is_not_found,
                    failed_put_stores_nothing,
                    concurrent_puts_of_same_content,
                    delete_removes,
                    list_reports_every_blob,
                    get_range_reads_parts_clamped,
                    touch_and_store_again_refresh_modified,
                    large_blob_roundtrips,
                    failed_large_put_leaves_nothing_listed,
                    dropped_put_leaves_nothing_listed,
                    adopt_keeps_a_file_whole_or_stores_nothing,
                ]);
                suite!(@tests $backend, end_to_end: [
                    fake_runner_like_the_seed,
                    failing_job_does_not_stall_the_queue,
                    result_event_only_after_blob_is_readable,
                    shell_runner_keeps_stdout_stderr_and_exit_code,
                    add_while_run_is_picked_up,
                    model_invariants,
                    verify_reports_missing_blobs,
                    gc_removes_only_old_unreferenced_blobs,
                    small_payloads_live_inline_and_large_ones_in_the_store,
                    small_outputs_live_inline_and_large_ones_in_the_store,
                    add_many_queues_every_payload_in_one_go,
                    bulk_add_over_several_chunks_reports_each_instance_once_in_order,
                    a_large_output_mirrored_live_is_stored_whole_and_its_live_file_removed,
                    an_empty_output_is_known_without_a_row,
                    an_inline_payload_comes_with_its_claim_and_a_corrupt_one_never_runs,
                ]);
                suite!(@fresh $backend, isolation: [
                    workers_in_one_process_never_kill_each_others_jobs,
                    worker_processes_never_kill_each_others_jobs,
                    what_a_job_leaves_in_its_group_is_stopped_when_it_exits,
                    a_leftover_outside_the_group_holding_the_output_is_killed_after_the_grace,
                    a_detached_leftover_is_killed_after_the_grace,
                ]);
            }
        )*
    };
    (@fresh $backend:ident, $module:ident: [$($test:ident),* $(,)?]) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let fresh = || -> futures_util::future::BoxFuture<'static, crate::Backend> {
                        Box::pin(crate::backends::$backend())
                    };
                    let me = concat!(stringify!($backend), "::", stringify!($module), "::", stringify!($test));
                    crate::$module::$test(&fresh, me).await;
                }
            )*
        }
    };
    (@tests $backend:ident, $module:ident: [$($test:ident),* $(,)?]) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let backend = crate::backends::$backend().await;
                    crate::$module::$test(&backend).await;
                }
            )*
        }
    };
}

suite!(sqlite_dir);
#[cfg(feature = "s3")]
suite!(sqlite_s3);
#[cfg(feature = "postgres")]
suite!(postgres_dir);
#[cfg(all(feature = "postgres", feature = "s3"))]
suite!(postgres_s3);
