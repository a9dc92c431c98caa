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
