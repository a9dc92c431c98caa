//! Claims as leases: a claim the control plane cannot serve fails the run at
//! once (it is never left `running` with nothing behind it), a claim retried
//! after its answer was lost gets the same lease, and a job delivered twice runs
//! once.

use std::time::Duration;

use reqwest::Method;
use serde_json::json;
use vm0_bus::Role;
use vm0_proto::worker::{self as pb, ClaimOutcome, FinalStatus};

use crate::harness::{Db, Stack, StackOptions};

const WAIT: Duration = Duration::from_secs(30);

/// Well under the timeout backstop (`timeoutSeconds` plus grace) that used to
/// end such runs.
const PROMPTLY: Duration = Duration::from_secs(10);

fn idle_stack() -> StackOptions {
    StackOptions {
        workers: 0,
        ..Default::default()
    }
}

/// A run whose agent was deleted while it waited, and one whose sealed secrets
/// cannot be opened, end `failed` as soon as a worker claims them, saying why;
/// the worker goes on with the next run.
async fn a_run_whose_spec_cannot_be_built_fails_at_claim(db: Db) {
    let mut stack = Stack::start(db, idle_stack()).await;
    for name in ["doomed", "sealed", "fine"] {
        stack
            .create_agent(name, json!({"command": ["echo", "ran"]}))
            .await;
    }
    let deleted = stack
        .create_run(0, json!({"agent": "doomed", "prompt": "p"}))
        .await;
    let agent_id = stack.run(&deleted).await["agentId"]
        .as_str()
        .expect("agentId")
        .to_owned();
    let (status, body) = stack
        .call(0, Method::DELETE, &format!("/v1/agents/{agent_id}"), None)
        .await;
    assert!(status.is_success(), "{status} {body}");
    let tampered = stack
        .create_run(
            0,
            json!({"agent": "sealed", "prompt": "p", "secrets": {"TOKEN": "s3cr3t-value"}}),
        )
        .await;
    vm0_db::testing::execute(
        &stack.database_url(),
        &format!("UPDATE runs SET secrets_sealed = 'v1:k:tampered' WHERE id = '{tampered}'"),
    )
    .await
    .expect("tamper");
    let fine = stack
        .create_run(0, json!({"agent": "fine", "prompt": "p"}))
        .await;

    stack.add_worker().await;
    for (id, why) in [
        (&deleted, "was deleted before the run started"),
        (&tampered, "secrets cannot be opened"),
    ] {
        let run = stack.wait_finished(id, PROMPTLY).await;
        assert_eq!(run["status"], "failed", "{run}");
        assert!(
            run["error"].as_str().is_some_and(|e| e.contains(why)),
            "the error says why: {run}"
        );
        assert!(run["startedAt"].is_null(), "it never ran: {run}");
        let logs = stack.logs(id).await;
        assert!(
            logs.iter()
                .any(|l| l["message"].as_str().is_some_and(|m| m.contains(why))),
            "{logs:?}"
        );
        assert!(!format!("{logs:?}").contains("s3cr3t-value"));
    }
    let run = stack.wait_finished(&fine, WAIT).await;
    assert_eq!(run["status"], "completed", "{run}");
}

/// The control plane's side of a lost answer: the same worker asking again
/// with the same claim token gets the same attempt and spec; another token, or
/// another worker, gets "already claimed".
async fn a_claim_retried_after_a_lost_answer_gets_the_same_lease(db: Db) {
    let stack = Stack::start(db, idle_stack()).await;
    stack
        .create_agent("once", json!({"command": ["echo", "ran"]}))
        .await;
    let id = stack
        .create_run(
            0,
            json!({"agent": "once", "prompt": "p", "secrets": {"TOKEN": "s3cr3t-value"}}),
        )
        .await;
    let credential = stack.worker_credential("retrier").await;
    let mut client =
        vm0_worker::control::connect(&stack.gateways[0].grpc, &credential, Some(&stack.ca_file()))
            .expect("client");
    client
        .register_worker(pb::RegisterWorkerRequest {
            capacity: Some(pb::Capacity {
                vcpus: 4,
                memory_mb: 4096,
                disk_mb: 4096,
                slots: 1,
            }),
            ..Default::default()
        })
        .await
        .expect("register");
    let claim = |token: &str| pb::ClaimRequest {
        run_id: id.clone(),
        claim_token: token.to_owned(),
        ..Default::default()
    };
    let first = client
        .claim(claim("token-1"))
        .await
        .expect("claim")
        .into_inner();
    assert_eq!(first.outcome(), ClaimOutcome::Claimed, "{first:?}");
    let again = client
        .claim(claim("token-1"))
        .await
        .expect("claim again")
        .into_inner();
    assert_eq!(again.outcome(), ClaimOutcome::Claimed, "{again:?}");
    assert_eq!(again.attempt, first.attempt);
    let (a, b) = (first.spec.expect("spec"), again.spec.expect("spec"));
    assert_eq!(a.next_event_seq, b.next_event_seq);
    assert_eq!(a.secret_values, vec!["s3cr3t-value".to_owned()]);
    assert_eq!(a, b, "the same lease, the same spec");
    for token in ["token-2", ""] {
        let other = client
            .claim(claim(token))
            .await
            .expect("claim")
            .into_inner();
        assert_eq!(
            other.outcome(),
            ClaimOutcome::AlreadyClaimed,
            "token {token:?}: {other:?}"
        );
    }
    // Only one claim was recorded.
    let logs = stack.logs(&id).await;
    let claims = logs
        .iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("claimed by"))
        })
        .count();
    assert_eq!(claims, 1, "{logs:?}");
    let done = client
        .finish(pb::FinishRequest {
            run_id: id.clone(),
            attempt: first.attempt,
            status: FinalStatus::Completed.into(),
            exit_code: Some(0),
            last_event_seq: b.next_event_seq - 1,
            ..Default::default()
        })
        .await
        .expect("finish")
        .into_inner();
    assert!(done.accepted);
    assert_eq!(stack.run(&id).await["status"], "completed");
}

/// A pending run whose job was lost (purged from the stream here; a gateway
/// that died between storing the run and publishing it does the same) is
/// published again after `VM0_PENDING_REPUBLISH_AFTER_SECS` and runs: the
/// republish is not dropped as a duplicate of the first job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_job_is_published_again_and_runs() {
    let mut stack = Stack::start(
        Db::Sqlite,
        StackOptions {
            pending_republish_after: Duration::from_secs(1),
            ..idle_stack()
        },
    )
    .await;
    stack
        .create_agent("once", json!({"command": ["echo", "ran"]}))
        .await;
    let id = stack
        .create_run(0, json!({"agent": "once", "prompt": "p"}))
        .await;
    let js = stack.jetstream().await;
    let mut jobs = js.get_stream(vm0_bus::JOBS_STREAM).await.expect("stream");
    // The create's publish is asynchronous: purge once it is there.
    let deadline = tokio::time::Instant::now() + WAIT;
    while jobs.info().await.expect("info").state.messages == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the job never came");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    jobs.purge().await.expect("purge");
    stack.add_worker().await;
    let run = stack.wait_finished(&id, PROMPTLY).await;
    assert_eq!(run["status"], "completed", "{run}");
}

/// The same job published again while its run executes (as a republish or a
/// redelivery does) does not start the command a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_delivered_twice_runs_once() {
    let stack = Stack::start(Db::Sqlite, StackOptions::default()).await;
    stack
        .create_agent(
            "slow",
            json!({"command": ["sh", "-c", "echo started; sleep 2; echo ended"]}),
        )
        .await;
    let id = stack
        .create_run(0, json!({"agent": "slow", "prompt": "p"}))
        .await;
    stack.wait_for(&id, WAIT, |s| s == "running").await;
    let bus = vm0_bus::Bus::connect(
        &stack.nats.options(Role::Gateway),
        Role::Gateway,
        "test-republisher",
    )
    .await
    .expect("bus");
    let job = vm0_bus::RunJob {
        run_id: id.clone(),
        ..Default::default()
    };
    bus.publish_job_again(&job).await.expect("publish");
    let run = stack.wait_finished(&id, WAIT).await;
    assert_eq!(run["status"], "completed", "{run}");
    let out: String = stack.output(&id).await;
    assert_eq!(out, "started\nended\n");
    // And nothing starts it later.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(stack.run(&id).await["status"], "completed");
}

/// Heartbeats reconcile: a run the control plane ended while its worker runs
/// it (a forced cancel whose NATS signal was lost, as here: the store is
/// changed and nothing is signalled) is stopped on the worker within a few
/// heartbeats; a run the store says the worker runs, but which the worker does
/// not (it restarted and forgot it), is failed instead of waiting for its
/// timeout.
async fn heartbeats_reconcile_what_runs_with_what_the_store_says(db: Db) {
    let stack = Stack::start(db, StackOptions::default()).await;
    let marker = crate::harness::marker("reconcile");
    stack
        .create_agent(
            "sleeper",
            json!({"command": ["sh", "-c", format!("echo up; sleep 600 # {marker}")], "timeoutSeconds": 3600}),
        )
        .await;
    let id = stack
        .create_run(0, json!({"agent": "sleeper", "prompt": "p"}))
        .await;
    stack.wait_for(&id, WAIT, |s| s == "running").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while crate::harness::processes_with(&marker) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the command never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let now = vm0_api_types::Timestamp::now().micros();
    vm0_db::testing::execute(
        &stack.database_url(),
        &format!(
            "UPDATE runs SET status = 'cancelled', completed_at = {now}, error = 'cancelled by user' WHERE id = '{id}'"
        ),
    )
    .await
    .expect("force-cancel in the store");
    crate::harness::assert_gone_within(
        &marker,
        Duration::from_secs(10),
        "the command of a run the control plane ended still runs",
    )
    .await;
    assert_eq!(stack.run(&id).await["status"], "cancelled");

    // A run the store gives to this worker, which it does not have: one that
    // ran here and ended, set back to running as if the worker had restarted
    // in the middle of it.
    stack
        .create_agent(
            "quick",
            json!({"command": ["echo", "done"], "timeoutSeconds": 3600}),
        )
        .await;
    let real = stack
        .create_run(0, json!({"agent": "sleeper", "prompt": "p"}))
        .await;
    stack.wait_for(&real, WAIT, |s| s == "running").await;
    let forgotten = stack
        .create_run(0, json!({"agent": "quick", "prompt": "p"}))
        .await;
    stack.wait_finished(&forgotten, WAIT).await;
    let long_ago = now - 60_000_000;
    vm0_db::testing::execute(
        &stack.database_url(),
        &format!(
            "UPDATE runs SET status = 'running', completed_at = NULL, started_at = {long_ago} \
             WHERE id = '{forgotten}'"
        ),
    )
    .await
    .expect("a run the worker does not have");
    assert_eq!(stack.run(&forgotten).await["status"], "running");
    let run = stack
        .wait_finished(&forgotten, Duration::from_secs(10))
        .await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["error"], "worker_lost", "{run}");
    // The run the worker really has is left alone.
    assert_eq!(stack.run(&real).await["status"], "running");
}

vm0_db::on_both_databases!(
    heartbeats_reconcile_what_runs_with_what_the_store_says,
    a_run_whose_spec_cannot_be_built_fails_at_claim,
    a_claim_retried_after_a_lost_answer_gets_the_same_lease,
);
