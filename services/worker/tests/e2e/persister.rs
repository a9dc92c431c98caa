//! The persister under a crash: a gateway process is killed with SIGKILL while it
//! stores a batch of telemetry; another gateway stores what the dead one held.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vm0_bus::{Bus, Role, Telemetry};

use crate::harness::{Db, Stack, StackOptions, parse_sse};

/// Output lines a "worker" (the test, with the workers' NATS rights) publishes.
const LINES: i64 = 8_000;

async fn post(stack: &Stack, base: &str, path: &str, body: Value) -> Value {
    let (status, body) = stack
        .call_at(base, reqwest::Method::POST, path, Some(body))
        .await;
    assert!(status.is_success(), "POST {path}: {status} {body}");
    body
}

/// A run's telemetry is being stored when its gateway dies (SIGKILL, messages
/// pulled and not acked); a second gateway stores it all: every event once, in
/// order, each output line one log line, and a stream resumed from the second
/// gateway gives exactly the suffix.
async fn a_persister_killed_mid_batch_loses_and_doubles_nothing(db: Db) {
    let stack = Stack::start(
        db,
        StackOptions {
            gateways: 0,
            workers: 0,
            ..StackOptions::default()
        },
    )
    .await;
    let mut first = stack.spawn_gateway_process(&[]).await;
    post(
        &stack,
        &first.base,
        "/v1/agents",
        json!({"name": "chatty", "config": {"command": ["true"]}}),
    )
    .await;
    let run = post(
        &stack,
        &first.base,
        "/v1/runs",
        json!({"agent": "chatty", "prompt": "p"}),
    )
    .await;
    let id = run["id"].as_str().expect("id").to_owned();
    let first_seq = stack.store.max_event_seq(&id).await.expect("seq") + 1;
    let last_seq = first_seq + LINES - 1;

    // Published as a worker does: pipelined, one message id per event.
    let bus = Bus::connect(&stack.nats.options(Role::Worker), Role::Worker, "chatty")
        .await
        .expect("bus");
    let mut acks = Vec::new();
    for seq in first_seq..=last_seq {
        let msg = Telemetry::Event {
            seq,
            event: vm0_api_types::runs::RunEventType::Output,
            data: json!({"content": format!("line {seq}\n"), "stream": "stdout"}),
            ts: vm0_api_types::Timestamp::now().micros(),
        };
        let msg_id = format!("{id}.evt.{seq}");
        acks.push(
            bus.send_telemetry(&id, &msg, Some(&msg_id))
                .await
                .expect("send"),
        );
        if acks.len() == 1000 {
            for ack in acks.drain(..) {
                ack.await.expect("stored by JetStream");
            }
        }
    }
    for ack in acks {
        ack.await.expect("stored by JetStream");
    }

    // Killed while storing: some stored, more pulled and unacked.
    let deadline = Instant::now() + Duration::from_secs(60);
    let stored_at_kill = loop {
        let stored = stack.store.max_event_seq(&id).await.expect("seq");
        if stored >= first_seq + 500 {
            first.kill_9();
            break stored;
        }
        assert!(
            Instant::now() < deadline,
            "the first gateway stores nothing"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    assert!(
        stored_at_kill < last_seq,
        "the first gateway stored everything before it was killed ({stored_at_kill})"
    );
    let js = stack.jetstream().await;
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream(vm0_bus::TELEMETRY_STREAM)
        .await
        .expect("stream")
        .get_consumer(vm0_bus::PERSISTER_CONSUMER)
        .await
        .expect("consumer");
    let in_flight = consumer.info().await.expect("info").num_ack_pending;
    assert!(
        in_flight > 0,
        "the kill found no message pulled and unacked"
    );
    let killed = Instant::now();

    let gap_wait = std::env::var("VM0_E2E_GAP_WAIT_MS").unwrap_or_default();
    let second = if gap_wait.is_empty() {
        stack.spawn_gateway_process(&[]).await
    } else {
        stack
            .spawn_gateway_process(&[("VM0_SSE_GAP_WAIT_MS", &gap_wait)])
            .await
    };
    // A client following the run from the start while the dead gateway's
    // messages wait for redelivery: it must get them, not be told they are lost.
    let follower = tokio::spawn(read_stream(
        stack.client.clone(),
        format!("{}/v1/runs/{id}/events", second.base),
        stack.token.clone(),
        None,
        last_seq,
    ));
    let deadline = Instant::now() + Duration::from_secs(90);
    // Everything, the dead gateway's unacked messages included (redelivered
    // after the persister's ack wait).
    let events = loop {
        let events = stack
            .store
            .events_after(&id, first_seq - 1, LINES as u64 + 10)
            .await
            .expect("events");
        if events.len() as i64 >= LINES {
            break events;
        }
        assert!(
            Instant::now() < deadline,
            "the second gateway stored {} of {LINES} events",
            events.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "{db:?}: killed with {} of {LINES} events stored and {in_flight} messages in flight; \
         all stored {:?} after the kill",
        stored_at_kill - first_seq + 1,
        killed.elapsed()
    );

    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert!(
        seqs == (first_seq..=last_seq).collect::<Vec<_>>(),
        "every event once, in order: {} events, first {:?}, last {:?}",
        seqs.len(),
        seqs.first(),
        seqs.last()
    );
    for e in &events {
        let data: Value = serde_json::from_str(&e.data).expect("data");
        assert_eq!(data["content"], format!("line {}\n", e.seq));
    }
    let logs = stack
        .store
        .list_logs(
            &id,
            &vm0_db::LogFilter {
                log_type: Some(vm0_api_types::runs::LogType::Agent),
                ..Default::default()
            },
            vm0_db::SortOrder::Asc,
            None,
            LINES as u64 + 10,
        )
        .await
        .expect("logs");
    assert_eq!(logs.len() as i64, LINES, "one log line per output line");

    let followed = follower.await.expect("follower");
    let errors: Vec<&Value> = followed
        .iter()
        .filter(|e| e.0 == "error")
        .map(|e| &e.2)
        .collect();
    assert!(
        errors.is_empty(),
        "the follower was told of losses: {errors:?}"
    );
    assert_ids(
        &followed,
        first_seq,
        last_seq,
        "the stream followed from the start",
    );

    // A stream resumed from the second gateway after the kill point: exactly the
    // events after it.
    let resumed = read_stream(
        stack.client.clone(),
        format!("{}/v1/runs/{id}/events", second.base),
        stack.token.clone(),
        Some(format!("evt_{stored_at_kill}")),
        last_seq,
    )
    .await;
    assert_ids(&resumed, stored_at_kill + 1, last_seq, "the resumed stream");
}

/// The output events' numbers are exactly `from..=to`.
fn assert_ids(events: &[(String, Option<String>, Value)], from: i64, to: i64, what: &str) {
    let ids: Vec<i64> = events
        .iter()
        .filter(|e| e.0 == "output")
        .filter_map(|e| e.1.as_deref().and_then(vm0_api_types::runs::parse_event_id))
        .collect();
    assert!(
        ids == (from..=to).collect::<Vec<_>>(),
        "{what}: {} output events from {:?} to {:?}, expected {from}..={to}",
        ids.len(),
        ids.first(),
        ids.last()
    );
}

/// Reads a run's event stream (which does not end: the run never finishes) up
/// to event `last`, within 60 s.
async fn read_stream(
    client: reqwest::Client,
    url: String,
    token: String,
    last_event_id: Option<String>,
    last: i64,
) -> Vec<(String, Option<String>, Value)> {
    let mut req = client.get(url).bearer_auth(token);
    if let Some(l) = last_event_id {
        req = req.header("last-event-id", l);
    }
    let mut resp = req.send().await.expect("stream");
    let mut text = String::new();
    let end = format!("id: evt_{last}\n");
    let whole = |text: &str| {
        text.find(&end)
            .is_some_and(|at| text[at..].contains("\n\n"))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !whole(&text) {
        let chunk = tokio::time::timeout_at(deadline.into(), resp.chunk())
            .await
            .expect("the stream reaches the last event in 60 s")
            .expect("chunk")
            .expect("the stream goes on");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    parse_sse(&text)
}

vm0_db::on_both_databases!(a_persister_killed_mid_batch_loses_and_doubles_nothing);
