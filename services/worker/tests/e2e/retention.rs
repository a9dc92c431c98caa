//! Retention: the records of runs that ended long ago are deleted, the runs stay,
//! and reading what went says so.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::json;
use vm0_bus::{Bus, Role, Telemetry};

use crate::harness::{Db, Stack, StackOptions};

const WAIT: Duration = Duration::from_secs(30);

/// A run's events, logs and metrics are deleted once it ended longer ago than
/// the retention; the run object stays; logs, metrics and events answer `400
/// invalid_state`; a message of that run redelivered afterwards stores nothing;
/// a run that ended since keeps its records.
async fn records_of_old_runs_are_deleted_and_say_so(db: Db) {
    let keep = Duration::from_secs(5);
    let stack = Stack::start(
        db,
        StackOptions {
            records_retention: Some(keep),
            ..StackOptions::default()
        },
    )
    .await;
    stack
        .create_agent(
            "talker",
            json!({"command": ["sh", "-c", "for i in 1 2 3; do echo line $i; done"]}),
        )
        .await;
    let old = stack
        .create_run(0, json!({"agent": "talker", "prompt": "p"}))
        .await;
    let run = stack.wait_finished(&old, WAIT).await;
    assert_eq!(run["status"], "completed", "{run}");
    let ended = Instant::now();
    assert!(
        stack.output(&old).await.contains("line 3\n"),
        "kept while young"
    );

    // Retention takes it within its period and a few ticks.
    let logs_path = format!("/v1/runs/{old}/logs");
    let purged_after = loop {
        let (status, body) = stack.call(0, Method::GET, &logs_path, None).await;
        if status == StatusCode::BAD_REQUEST {
            assert_eq!(body["error"]["code"], "invalid_state", "{body}");
            assert!(
                body["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("logs were deleted")),
                "{body}"
            );
            break ended.elapsed();
        }
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(
            ended.elapsed() < keep + WAIT,
            "records still there after {:?}",
            ended.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("records deleted {purged_after:?} after the run ended (retention {keep:?})");
    assert!(
        purged_after >= keep - Duration::from_millis(500),
        "too early: {purged_after:?}"
    );

    for path in [
        format!("/v1/runs/{old}/metrics"),
        format!("/v1/runs/{old}/events"),
    ] {
        let (status, body) = stack.call(0, Method::GET, &path, None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert_eq!(body["error"]["code"], "invalid_state", "{path}: {body}");
    }
    let run = stack.get(&format!("/v1/runs/{old}")).await;
    assert_eq!(run["status"], "completed", "the run stays: {run}");
    assert!(no_events(&stack, &old).await, "no event row left");

    // A message of the old run arriving late (a redelivery) stores nothing;
    // a new run's records, persisted after it, are all there.
    let nats = stack.nats.options(Role::Worker);
    let bus = Bus::connect(&nats, Role::Worker, "late")
        .await
        .expect("bus");
    let late = Telemetry::Event {
        seq: 99,
        event: vm0_api_types::runs::RunEventType::Output,
        data: json!({"content": "late\n", "stream": "stdout"}),
        ts: vm0_api_types::Timestamp::now().micros(),
    };
    bus.publish_telemetry(&old, &late).await.expect("publish");
    let young = stack
        .create_run(0, json!({"agent": "talker", "prompt": "p"}))
        .await;
    stack.wait_finished(&young, WAIT).await;
    let deadline = Instant::now() + WAIT;
    while stack
        .logs(&young)
        .await
        .iter()
        .filter(|l| l["type"] == "agent")
        .count()
        < 3
    {
        assert!(Instant::now() < deadline, "the young run's logs are stored");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        no_events(&stack, &old).await,
        "a late message brought nothing back"
    );
    let (status, _) = stack.call(0, Method::GET, &logs_path, None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

/// Whether the store holds no event of `run`.
async fn no_events(stack: &Stack, run: &str) -> bool {
    let events = stack.store.events_after(run, 0, 10).await.expect("events");
    events.is_empty()
}

vm0_db::on_both_databases!(records_of_old_runs_are_deleted_and_say_so);
