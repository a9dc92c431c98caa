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

type Events = Vec<(String, Option<String>, serde_json::Value)>;

/// A run's events once `n` outputs are stored (or after a minute).
async fn events_with_outputs(stack: &Stack, id: &str, n: usize) -> Events {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let events = stack.events(0, id, None).await;
        if events.iter().filter(|e| e.0 == "output").count() == n
            || tokio::time::Instant::now() > deadline
        {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `tick 0` .. `tick n-1`, each once and in order, numbered without a gap or a
/// duplicate, nothing reported lost.
fn every_tick_once_in_order(events: &Events, n: usize) {
    let expected: String = (0..n).map(|i| format!("tick {i}\n")).collect();
    assert_eq!(
        crate::harness::output_of(events),
        expected,
        "every line, in order: {events:?}"
    );
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
    a_forced_cancel_of_a_chatty_run_keeps_its_events_whole,
    the_reaper_ending_a_chatty_run_keeps_its_events_whole,
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
    let events = events_with_outputs(&stack, &id, 50).await;
    every_tick_once_in_order(&events, 50);
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
    let js = stack.jetstream().await;
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
    let events = events_with_outputs(&stack, &id, 40).await;
    every_tick_once_in_order(&events, 40);
}

/// The reaper reads every running run, not the oldest thousand: a run whose
/// worker is gone is failed even behind a thousand older healthy ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_sees_past_a_thousand_running_runs() {
    use futures::StreamExt;
    let stack = Stack::start(
        Db::Sqlite,
        StackOptions {
            workers: 0,
            ..Default::default()
        },
    )
    .await;
    stack
        .create_agent("long", json!({"command": ["sleep", "3600"]}))
        .await;
    let ids: Vec<String> = futures::stream::iter(0..1001)
        .map(|_| stack.create_run(0, json!({"agent": "long", "prompt": "p"})))
        .buffer_unordered(16)
        .collect()
        .await;
    let lost = ids.iter().max().expect("ids").clone();
    let now = vm0_api_types::Timestamp::now().micros();
    let (busy_since, lost_since) = (now - 100_000_000, now - 50_000_000);
    // Silent far longer than the stack's worker_lost_after.
    let gone_heard = now - 3_600_000_000;
    let url = stack.database_url();
    for sql in [
        format!(
            "INSERT INTO workers (id, hostname, sandbox, capacity, free, registered_at, last_heartbeat_at) \
             VALUES ('busy', 'h', 'bubblewrap', '{{}}', '{{}}', {now}, {now}), \
                    ('gone', 'h', 'bubblewrap', '{{}}', '{{}}', {gone_heard}, {gone_heard})"
        ),
        format!(
            "UPDATE runs SET status = 'running', attempt = 1, worker_id = 'busy', \
             started_at = {busy_since}, timeout_seconds = 3600 WHERE id <> '{lost}'"
        ),
        // Started last, its id last: behind the thousand in either order.
        format!(
            "UPDATE runs SET status = 'running', attempt = 1, worker_id = 'gone', \
             started_at = {lost_since}, timeout_seconds = 3600 WHERE id = '{lost}'"
        ),
    ] {
        vm0_db::testing::execute(&url, &sql).await.expect("sql");
    }
    let run = stack.wait_finished(&lost, Duration::from_secs(10)).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["error"], "worker_lost", "{run}");
    let busy = stack.run(&ids.iter().min().expect("ids").clone()).await;
    assert_eq!(
        busy["status"], "running",
        "a healthy run is left alone: {busy}"
    );
}

/// A run over long before the first periodic sample (2 s) still has one: the
/// last, taken when its command ended, with the CPU it used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_run_has_its_last_sample() {
    let stack = Stack::start(Db::Sqlite, StackOptions::default()).await;
    stack
        .create_agent(
            "brief",
            json!({"command": ["sh", "-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo done"]}),
        )
        .await;
    let id = stack
        .create_run(0, json!({"agent": "brief", "prompt": "p"}))
        .await;
    let run = stack.wait_finished(&id, WAIT).await;
    assert_eq!(run["status"], "completed", "{run}");
    assert!(
        run["executionTimeMs"].as_i64().unwrap_or(i64::MAX) < 2000,
        "{run}"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let m = stack.get(&format!("/v1/runs/{id}/metrics")).await;
        if m["summary"]["sampleCount"].as_i64().unwrap_or(0) >= 1 {
            break m;
        }
        assert!(tokio::time::Instant::now() < deadline, "no sample: {m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let sample = &metrics["data"][0];
    assert!(sample["memoryUsedMb"].is_number(), "{metrics}");
    assert!(
        sample["memoryTotalMb"].as_i64().unwrap_or(0) > 0,
        "{metrics}"
    );
}

/// A run's output is capped (`VM0_RUN_OUTPUT_MAX_BYTES`): past it, output is
/// read and dropped, the run goes on and completes, and its log says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_past_the_cap_is_dropped_and_said() {
    let cap = 100_000u64;
    let stack = Stack::start(
        Db::Sqlite,
        StackOptions {
            worker_env: vec![("VM0_RUN_OUTPUT_MAX_BYTES", cap.to_string())],
            ..Default::default()
        },
    )
    .await;
    stack
        .create_agent(
            "chatty",
            json!({"command": ["sh", "-c", "head -c 1000000 /dev/zero | tr '\\0' a | fold -w 99; echo; echo still-running >&2"]}),
        )
        .await;
    let id = stack
        .create_run(0, json!({"agent": "chatty", "prompt": "p"}))
        .await;
    let run = stack.wait_finished(&id, WAIT).await;
    assert_eq!(run["status"], "completed", "{run}");
    let events = stack.events(0, &id, None).await;
    let truncated: Vec<_> = events.iter().filter(|e| e.0 == "error").collect();
    assert_eq!(truncated.len(), 1, "{truncated:?}");
    assert_eq!(truncated[0].2["code"], "output_truncated", "{truncated:?}");
    assert_eq!(events.last().map(|e| e.0.as_str()), Some("complete"));
    let kept: u64 = events
        .iter()
        .filter(|e| e.0 == "output")
        .map(|e| e.2["content"].as_str().unwrap_or_default().len() as u64)
        .sum();
    assert!(kept <= cap, "{kept} bytes kept past a cap of {cap}");
    assert!(kept >= cap - 100, "output up to the cap is kept: {kept}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let logs = stack.logs(&id).await;
        let said = |needle: &str| {
            logs.iter().any(|l| {
                l["type"] == "system" && l["message"].as_str().is_some_and(|m| m.contains(needle))
            })
        };
        if said("VM0_RUN_OUTPUT_MAX_BYTES") && said("dropped past the cap") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{logs:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs are admitted by the vCPUs they ask for, not only by slots: a worker
/// of 2 vCPUs and 4 slots runs two one-vCPU runs at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_are_admitted_by_the_vcpus_they_ask_for() {
    let stack = Stack::start(
        Db::Sqlite,
        StackOptions {
            worker_slots: 4,
            worker_env: vec![("VM0_WORKER_VCPUS", "2".into())],
            ..Default::default()
        },
    )
    .await;
    stack
        .create_agent(
            "one-cpu",
            json!({"command": ["sleep", "1"], "resources": {"vcpus": 1}}),
        )
        .await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(
            stack
                .create_run(0, json!({"agent": "one-cpu", "prompt": "p"}))
                .await,
        );
    }
    let mut spans = Vec::new();
    for id in &ids {
        let run = stack.wait_finished(id, WAIT).await;
        assert_eq!(run["status"], "completed", "{run}");
        let at = |k: &str| chrono_micros(run[k].as_str().unwrap_or_default());
        spans.push((at("startedAt"), at("completedAt")));
    }
    // At no run's start were more than two running.
    for (start, _) in &spans {
        let running = spans
            .iter()
            .filter(|(s, e)| s <= start && start < e)
            .count();
        assert!(running <= 2, "{running} runs at once on 2 vCPUs: {spans:?}");
    }
}

/// Microseconds since the epoch of an RFC 3339 timestamp the API wrote.
fn chrono_micros(ts: &str) -> i64 {
    vm0_api_types::Timestamp::parse(ts)
        .map(|t| t.micros())
        .unwrap_or_default()
}

/// The control plane ends a run that prints thousands of lines (a cancel it
/// does not wait for: `VM0_CANCEL_WAIT_MS` of 1 ms), while the worker is still
/// publishing: in the store and in a stream resumed from the middle, every event
/// once, in order, numbered without a gap, `complete` last; the command stops.
async fn a_forced_cancel_of_a_chatty_run_keeps_its_events_whole(db: Db) {
    let marker = crate::harness::marker("chatty");
    let stack = Stack::start(
        db,
        StackOptions {
            cancel_wait: Some(Duration::from_millis(1)),
            ..Default::default()
        },
    )
    .await;
    let id = start_chatty_run(&stack, &marker).await;
    let (status, run) = stack
        .call(
            0,
            reqwest::Method::POST,
            &format!("/v1/runs/{id}/cancel"),
            None,
        )
        .await;
    assert!(status.is_success(), "{status} {run}");
    assert_eq!(run["status"], "cancelled", "{run}");
    // The worker hears the cancel too; its late telemetry is not stored after
    // `complete`.
    crate::harness::assert_gone_within(&marker, Duration::from_secs(10), "the command still runs")
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    events_are_whole(&stack, &id).await;
}

/// The reaper ends a run printing without pause: its worker is stopped
/// (SIGSTOP) past `worker_lost_after`, so the run ends `failed` /
/// `worker_lost` while the command goes on and its output waits in the
/// worker; then the worker goes on (SIGCONT) and sends what it held, numbered
/// after the reaper's `complete`. None of it is stored; the events stay whole;
/// the worker's next heartbeat stops the command.
async fn the_reaper_ending_a_chatty_run_keeps_its_events_whole(db: Db) {
    let marker = crate::harness::marker("reaped");
    let stack = Stack::start(
        db,
        StackOptions {
            worker_lost_after: Duration::from_secs(2),
            ..Default::default()
        },
    )
    .await;
    let id = start_chatty_run(&stack, &marker).await;
    let worker = stack.workers[0].pid().to_string();
    let signal = |sig: &str| {
        let sent = std::process::Command::new("kill")
            .args([sig, &worker])
            .status()
            .expect("kill");
        assert!(sent.success(), "kill {sig} {worker}");
    };
    signal("-STOP");
    let run = stack.wait_for(&id, WAIT, |s| s == "failed").await;
    signal("-CONT");
    assert_eq!(run["error"], "worker_lost", "{run}");
    crate::harness::assert_gone_within(
        &marker,
        Duration::from_secs(15),
        "the command still runs after its worker came back",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    events_are_whole(&stack, &id).await;
}

/// Starts a run printing numbered lines without pause (its command line holds
/// `marker`); returns once 100 of them are stored.
async fn start_chatty_run(stack: &Stack, marker: &str) -> String {
    stack
        .create_agent(
            "chatty",
            json!({"command": ["sh", "-c", format!("i=0; while true; do echo line $i; i=$((i+1)); done # {marker}")]}),
        )
        .await;
    let id = stack
        .create_run(0, json!({"agent": "chatty", "prompt": "p"}))
        .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while stack.logs(&id).await.len() < 100 {
        assert!(tokio::time::Instant::now() < deadline, "no output");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    id
}

/// A chatty run the control plane ended: every streamed event once, numbered
/// 1..n, its lines in order, `complete` last and once; the store holds nothing
/// after `complete`; a stream resumed from the middle gives the same suffix.
async fn events_are_whole(stack: &Stack, id: &str) {
    let events = stack.events(0, id, None).await;
    let seqs: Vec<i64> = events
        .iter()
        .filter_map(|e| e.1.as_deref()?.strip_prefix("evt_")?.parse().ok())
        .collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as i64).collect::<Vec<_>>(),
        "no gap, no duplicate"
    );
    assert_eq!(
        events.last().map(|e| e.0.as_str()),
        Some("complete"),
        "complete is last"
    );
    assert_eq!(events.iter().filter(|e| e.0 == "complete").count(), 1);
    let lines: Vec<String> = events
        .iter()
        .filter(|e| e.0 == "output")
        .map(|e| e.2["content"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(lines.len() >= 100, "{} lines", lines.len());
    let expected: Vec<String> = (0..lines.len()).map(|i| format!("line {i}\n")).collect();
    assert_eq!(lines, expected, "every line once, in order");
    // The store holds nothing after `complete` either.
    let stored = stack
        .store
        .events_after(id, 0, 1_000_000)
        .await
        .expect("stored events");
    assert_eq!(
        stored.last().map(|e| (e.seq, e.event_type.as_str())),
        Some((seqs.len() as i64, "complete")),
        "{} events stored, {} streamed",
        stored.len(),
        seqs.len()
    );
    // Resumed from the middle: the same suffix.
    let middle = format!("evt_{}", seqs.len() / 2);
    let resumed = stack.events(0, id, Some(&middle)).await;
    assert_eq!(resumed.as_slice(), &events[seqs.len() / 2..]);
}
