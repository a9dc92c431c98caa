//! A run's lifecycle under faults and hostile output: nothing one run does stops
//! another's telemetry, nothing wedges. (The table of faults is docs/reliability.md.)

use std::time::Duration;

use serde_json::json;

use crate::harness::{Db, Stack, StackOptions};

const WAIT: Duration = Duration::from_secs(30);

async fn output(stack: &Stack, token: &str, id: &str) -> String {
    let mut stack_as = stack
        .client
        .get(stack.url(0, &format!("/v1/runs/{id}/events")));
    stack_as = stack_as.bearer_auth(token);
    let text = stack_as
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("text");
    crate::harness::parse_sse(&text)
        .iter()
        .filter(|e| e.0 == "output")
        .map(|e| e.2["content"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// A NUL byte in one tenant's output (PostgreSQL's text refuses it) is made
/// storable at the edge; every later run of every tenant still gets its output.
async fn a_nul_byte_in_output_stops_nobody_s_telemetry(db: Db) {
    let stack = Stack::start(db, StackOptions::default()).await;
    stack
        .create_agent(
            "nul",
            json!({"command": ["sh", "-c", "printf 'a\\000b\\n'; printf 'ok\\n'"]}),
        )
        .await;
    let id = stack
        .create_run(0, json!({"agent": "nul", "prompt": "p"}))
        .await;
    let run = stack.wait_finished(&id, WAIT).await;
    assert_eq!(run["status"], "completed", "{run}");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let logs = stack.logs(&id).await;
        let agent: Vec<&str> = logs
            .iter()
            .filter(|l| l["type"] == "agent")
            .filter_map(|l| l["message"].as_str())
            .collect();
        if agent.len() == 2 {
            assert_eq!(agent, vec!["a\u{fffd}b\n", "ok\n"], "NUL becomes U+FFFD");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the NUL run's output never stored: {logs:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(output(&stack, &stack.token, &id).await, "a\u{fffd}b\nok\n");

    // Another tenant's run after it: its output is stored.
    let other = stack.mint_token("globex").await;
    let (status, _) = stack
        .client
        .post(stack.url(0, "/v1/agents"))
        .bearer_auth(&other)
        .json(&json!({"name": "hello", "config": {"command": ["echo", "hello"]}}))
        .send()
        .await
        .map(|r| (r.status(), ()))
        .expect("agent");
    assert_eq!(status.as_u16(), 201);
    let resp: serde_json::Value = stack
        .client
        .post(stack.url(0, "/v1/runs"))
        .bearer_auth(&other)
        .json(&json!({"agent": "hello", "prompt": "p"}))
        .send()
        .await
        .expect("run")
        .json()
        .await
        .expect("json");
    let later = resp["id"].as_str().expect("id").to_owned();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let logs: Vec<String> = stack
            .store
            .list_logs(
                &later,
                &Default::default(),
                vm0_db::SortOrder::Asc,
                None,
                100,
            )
            .await
            .expect("logs")
            .into_iter()
            .map(|l| l.message)
            .collect();
        if logs.iter().any(|m| m == "hello\n") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a later run of another tenant got no output stored: {logs:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A message the store keeps refusing (here: metrics, with their table renamed
/// away) is set aside after a bounded number of deliveries, with a `system` log
/// line on its run; the rest of its batch (the run's output) is stored at once.
async fn a_message_that_keeps_failing_is_set_aside(db: Db) {
    let stack = Stack::start(db, StackOptions::default()).await;
    stack
        .create_agent(
            "chatty",
            json!({"command": ["sh", "-c", "for i in 1 2 3; do echo line $i; sleep 0.3; done"]}),
        )
        .await;
    vm0_db::testing::execute(
        &stack.database_url(),
        "ALTER TABLE run_metrics RENAME TO run_metrics_away",
    )
    .await
    .expect("break the metrics table");
    let id = stack
        .create_run(0, json!({"agent": "chatty", "prompt": "p"}))
        .await;
    let run = stack.wait_finished(&id, WAIT).await;
    assert_eq!(run["status"], "completed", "{run}");
    let deadline = tokio::time::Instant::now() + WAIT;
    let logs = loop {
        let logs = stack.logs(&id).await;
        if logs.iter().any(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("set aside"))
        }) {
            break logs;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing set aside: {logs:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    vm0_db::testing::execute(
        &stack.database_url(),
        "ALTER TABLE run_metrics_away RENAME TO run_metrics",
    )
    .await
    .expect("mend it");
    let agent: Vec<&str> = logs
        .iter()
        .filter(|l| l["type"] == "agent")
        .filter_map(|l| l["message"].as_str())
        .collect();
    assert_eq!(
        agent,
        vec!["line 1\n", "line 2\n", "line 3\n"],
        "the output was stored"
    );
    let line = logs
        .iter()
        .filter_map(|l| l["message"].as_str())
        .find(|m| m.contains("set aside"))
        .unwrap_or_default();
    assert!(
        line.contains("(metrics)")
            && line.contains(&format!(
                "{} attempts",
                vm0_gateway::persister::DEAD_LETTER_AFTER
            )),
        "{line}"
    );
    assert!(
        line.contains(&format!("deadletter.runs.{id}.metrics")),
        "{line}"
    );
    assert_eq!(
        output(&stack, &stack.token, &id).await,
        "line 1\nline 2\nline 3\n"
    );
}

/// A prompt of any size the API accepts (250 KiB here; one environment string
/// may hold 128 KiB) reaches the command on stdin and in `VM0_PROMPT_FILE`;
/// `VM0_PROMPT` holds it when it fits.
async fn prompts_of_any_accepted_size_reach_the_command(db: Db) {
    let stack = Stack::start(db, StackOptions::default()).await;
    stack
        .create_agent(
            "reader",
            json!({"command": ["sh", "-c", "echo stdin=$(wc -c | tr -d ' ') file=$(wc -c < \"$VM0_PROMPT_FILE\" | tr -d ' ') env=${#VM0_PROMPT}"]}),
        )
        .await;
    for (size, env) in [(250 * 1024, 0), (1000, 1000)] {
        let prompt = "x".repeat(size);
        let id = stack
            .create_run(0, json!({"agent": "reader", "prompt": prompt}))
            .await;
        let run = stack.wait_finished(&id, WAIT).await;
        assert_eq!(run["status"], "completed", "{size}: {}", run["error"]);
        assert_eq!(
            output(&stack, &stack.token, &id).await,
            format!("stdin={size} file={size} env={env}\n")
        );
    }
}

vm0_db::on_both_databases!(
    a_nul_byte_in_output_stops_nobody_s_telemetry,
    a_message_that_keeps_failing_is_set_aside,
    prompts_of_any_accepted_size_reach_the_command,
);

/// NATS goes away while a run prints: the worker keeps what it could not
/// publish and sends it again once NATS is back. Every line is stored, numbered
/// without a gap, and the stream replays them all in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_survives_nats_going_away_mid_run() {
    let mut stack = Stack::start(Db::Sqlite, StackOptions::default()).await;
    stack
        .create_agent(
            "ticker",
            json!({"command": ["sh", "-c", "i=0; while [ $i -lt 50 ]; do echo tick $i; i=$((i+1)); sleep 0.1; done"]}),
        )
        .await;
    let id = stack
        .create_run(0, json!({"agent": "ticker", "prompt": "p"}))
        .await;
    stack.wait_for(&id, WAIT, |s| s == "running").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    // Longer than a JetStream publish waits for its ack (5 s).
    stack.nats.stop().await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    stack.nats.resume().await;
    let run = stack.wait_finished(&id, Duration::from_secs(90)).await;
    assert_eq!(run["status"], "completed", "{run}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let events = loop {
        let events = stack.events(0, &id, None).await;
        let outputs = events.iter().filter(|e| e.0 == "output").count();
        if outputs == 50 || tokio::time::Instant::now() > deadline {
            break events;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let lines: Vec<String> = events
        .iter()
        .filter(|e| e.0 == "output")
        .map(|e| e.2["content"].as_str().unwrap_or_default().to_owned())
        .collect();
    let expected: Vec<String> = (0..50).map(|i| format!("tick {i}\n")).collect();
    assert_eq!(lines, expected, "every line, in order: {events:?}");
    let ids: Vec<i64> = events
        .iter()
        .filter_map(|e| e.1.as_deref()?.strip_prefix("evt_")?.parse().ok())
        .collect();
    assert_eq!(
        ids,
        (1..=ids.len() as i64).collect::<Vec<_>>(),
        "no gap, no duplicate"
    );
    assert!(
        !events.iter().any(|e| e.0 == "error"),
        "nothing reported lost: {events:?}"
    );
}

/// JetStream refuses a run's telemetry for a while (its stream is full, with
/// the discard-new policy): the worker sends what was refused again once it is
/// taken. No line is lost, no number skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_refused_for_a_while_is_sent_again() {
    let stack = Stack::start(Db::Sqlite, StackOptions::default()).await;
    stack
        .create_agent(
            "ticker",
            json!({"command": ["sh", "-c", "i=0; while [ $i -lt 40 ]; do echo tick $i; i=$((i+1)); sleep 0.1; done"]}),
        )
        .await;
    let nats = stack.nats.options(vm0_bus::Role::Gateway);
    let creds = nats.credentials.clone().expect("creds");
    let client = async_nats::ConnectOptions::new()
        .user_and_password(creds.user, creds.password)
        .custom_inbox_prefix(vm0_bus::Role::Gateway.inbox_prefix())
        .connect(&nats.url)
        .await
        .expect("connect");
    let js = async_nats::jetstream::new(client);
    let id = stack
        .create_run(0, json!({"agent": "ticker", "prompt": "p"}))
        .await;
    stack.wait_for(&id, WAIT, |s| s == "running").await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut stream = js
        .get_stream(vm0_bus::TELEMETRY_STREAM)
        .await
        .expect("stream");
    let normal = stream.info().await.expect("info").config.clone();
    let mut full = normal.clone();
    full.max_messages = i64::try_from(stream.info().await.expect("info").state.messages)
        .unwrap_or(1)
        .max(1);
    full.discard = async_nats::jetstream::stream::DiscardPolicy::New;
    js.update_stream(&full).await.expect("refuse new telemetry");
    tokio::time::sleep(Duration::from_secs(3)).await;
    js.update_stream(&normal)
        .await
        .expect("take telemetry again");
    let run = stack.wait_finished(&id, Duration::from_secs(90)).await;
    assert_eq!(run["status"], "completed", "{run}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let events = loop {
        let events = stack.events(0, &id, None).await;
        if events.iter().filter(|e| e.0 == "output").count() == 40
            || tokio::time::Instant::now() > deadline
        {
            break events;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let lines: Vec<String> = events
        .iter()
        .filter(|e| e.0 == "output")
        .map(|e| e.2["content"].as_str().unwrap_or_default().to_owned())
        .collect();
    let expected: Vec<String> = (0..40).map(|i| format!("tick {i}\n")).collect();
    assert_eq!(lines, expected, "every line, in order");
    let ids: Vec<i64> = events
        .iter()
        .filter_map(|e| e.1.as_deref()?.strip_prefix("evt_")?.parse().ok())
        .collect();
    assert_eq!(
        ids,
        (1..=ids.len() as i64).collect::<Vec<_>>(),
        "no gap, no duplicate"
    );
    assert!(!events.iter().any(|e| e.0 == "error"), "{events:?}");
}
