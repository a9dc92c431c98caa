use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;

use crate::harness::{Db, Stack, StackOptions, processes_with};

const WAIT: Duration = Duration::from_secs(30);

async fn run_completes_with_output_in_sse_logs_and_metrics(db: Db) {
    let stack = Stack::start(db, StackOptions::default()).await;
    stack
        .create_agent(
            "greeter",
            json!({"command": ["sh", "-c", "echo \"prompt: $VM0_PROMPT\"; read line; echo \"stdin: $line\"; echo \"var: $GREETING secret: $API_KEY\"; echo to-stderr >&2; sleep 0.5"]}),
        )
        .await;
    let id = stack
        .create_run(0, json!({"agent": "greeter", "prompt": "hello there", "variables": {"GREETING": "hi"}, "secrets": {"API_KEY": "sk-very-secret"}}))
        .await;
    let events = stack.events(0, &id, None).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"status"));
    assert_eq!(kinds.last(), Some(&"complete"), "{kinds:?}");
    let ids: Vec<String> = events.iter().filter_map(|e| e.1.clone()).collect();
    let expected: Vec<String> = (1..=ids.len()).map(|n| format!("evt_{n}")).collect();
    assert_eq!(ids, expected, "ids are contiguous");
    let output: String = events
        .iter()
        .filter(|e| e.0 == "output")
        .map(|e| e.2["content"].as_str().unwrap_or_default())
        .collect();
    assert!(output.contains("prompt: hello there\n"), "{output}");
    assert!(output.contains("stdin: hello there\n"), "{output}");
    assert!(
        output.contains("var: hi secret: ***\n"),
        "secret masked: {output}"
    );
    assert!(!format!("{events:?}").contains("sk-very-secret"));
    let complete = &events.last().expect("complete").2;
    assert_eq!(complete["status"], "completed");
    assert_eq!(complete["exitCode"], 0);

    let run = stack.run(&id).await;
    assert_eq!(run["status"], "completed");
    assert!(run["startedAt"].is_string() && run["completedAt"].is_string());
    assert!(run["executionTimeMs"].as_i64().is_some_and(|ms| ms >= 500));

    // Logs and metrics are written by the persister, shortly after.
    let deadline = Instant::now() + WAIT;
    loop {
        let logs = stack.logs(&id).await;
        let agent: Vec<_> = logs.iter().filter(|l| l["type"] == "agent").collect();
        let metrics = stack.get(&format!("/v1/runs/{id}/metrics")).await;
        if agent.len() >= 4 && metrics["summary"]["sampleCount"].as_i64().unwrap_or(0) >= 1 {
            assert!(
                agent
                    .iter()
                    .any(|l| l["level"] == "warn" && l["message"] == "to-stderr\n")
            );
            let system: Vec<_> = logs
                .iter()
                .filter(|l| l["type"] == "system")
                .map(|l| l["message"].as_str().unwrap_or_default())
                .collect();
            assert!(
                system.iter().any(|m| m.contains("bubblewrap")),
                "the backend is named: {system:?}"
            );
            assert!(!format!("{logs:?}").contains("sk-very-secret"));
            let sample = &metrics["data"][0];
            assert!(
                sample["memoryUsedMb"].is_i64() && sample["memoryTotalMb"] == 512,
                "{sample}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "logs/metrics not persisted: {logs:?} {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn failing_command_ends_failed_with_its_exit_code(db: Db) {
    let stack = Stack::start(db, StackOptions::default()).await;
    stack
        .create_agent(
            "broken",
            json!({"command": ["sh", "-c", "echo bad >&2; exit 7"]}),
        )
        .await;
    stack
        .create_agent("missing", json!({"command": ["/no/such/program"]}))
        .await;
    let id = stack
        .create_run(0, json!({"agent": "broken", "prompt": "p"}))
        .await;
    let run = stack.wait_finished(&id, WAIT).await;
    assert_eq!(run["status"], "failed");
    assert_eq!(run["error"], "exited with code 7");
    let id = stack
        .create_run(0, json!({"agent": "missing", "prompt": "p"}))
        .await;
    let run = stack.wait_finished(&id, WAIT).await;
    assert_eq!(run["status"], "failed");
    assert!(
        run["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("exited with code")),
        "{run}"
    );
}

async fn timeout_kills_the_run(db: Db) {
    let e2e_timeout_marker = crate::harness::marker("timeout");
    let stack = Stack::start(db, StackOptions::default()).await;
    stack
        .create_agent("slow", json!({"command": ["sh", "-c", format!("echo started; sleep 600 # {e2e_timeout_marker}")], "timeoutSeconds": 1}))
        .await;
    let id = stack
        .create_run(0, json!({"agent": "slow", "prompt": "p"}))
        .await;
    let run = stack.wait_finished(&id, WAIT).await;
    assert_eq!(run["status"], "timeout");
    assert_eq!(run["error"], "timed out after 1 s");
    let ms = run["executionTimeMs"].as_i64().expect("ms");
    assert!((1000..3000).contains(&ms), "{ms} ms");
    assert_eq!(
        processes_with(&e2e_timeout_marker),
        0,
        "the sandbox is gone"
    );
}

async fn cancel_of_a_running_run_ends_its_command_within_1s(db: Db) {
    let e2e_cancel_marker = crate::harness::marker("cancel");
    let stack = Stack::start(db, StackOptions::default()).await;
    stack
        .create_agent(
            "sleeper",
            json!({"command": ["sh", "-c", format!("echo up; sleep 600 # {e2e_cancel_marker}")]}),
        )
        .await;
    let id = stack
        .create_run(0, json!({"agent": "sleeper", "prompt": "p"}))
        .await;
    stack.wait_for(&id, WAIT, |s| s == "running").await;
    let started = Instant::now();
    let (status, run) = stack
        .call(0, Method::POST, &format!("/v1/runs/{id}/cancel"), None)
        .await;
    let took = started.elapsed();
    assert_eq!(status.as_u16(), 200, "{run}");
    assert_eq!(run["status"], "cancelled");
    assert!(took < Duration::from_secs(2), "cancel took {took:?}");
    let logs = stack.logs(&id).await;
    // The worker's own report, not the control plane's forced cancel.
    let confirmed = logs
        .iter()
        .any(|l| l["message"] == "run cancelled: cancelled by user");
    assert!(confirmed, "the worker confirmed the cancel: {logs:?}");
    // The command is gone within a second of the request.
    while processes_with(&e2e_cancel_marker) > 0 && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let gone = started.elapsed();
    eprintln!("bubblewrap cancel: answered in {took:?}, the command gone after {gone:?}");
    assert_eq!(processes_with(&e2e_cancel_marker), 0, "the sandbox is gone");
    assert!(
        gone < Duration::from_secs(1),
        "the command outlived its cancel by {gone:?}"
    );
    let events = stack.events(0, &id, None).await;
    assert_eq!(events.last().map(|e| e.0.as_str()), Some("complete"));
}

async fn cancel_of_a_pending_run_means_it_never_starts(db: Db) {
    let mut stack = Stack::start(
        db,
        StackOptions {
            workers: 0,
            ..Default::default()
        },
    )
    .await;
    stack
        .create_agent(
            "never",
            json!({"command": ["sh", "-c", "echo should-not-run"]}),
        )
        .await;
    let id = stack
        .create_run(0, json!({"agent": "never", "prompt": "p"}))
        .await;
    let (status, run) = stack
        .call(0, Method::POST, &format!("/v1/runs/{id}/cancel"), None)
        .await;
    assert_eq!(status.as_u16(), 200);
    assert_eq!(run["status"], "cancelled");
    // A worker arrives and finds the job: it must drop it.
    let other = stack
        .create_run(0, json!({"agent": "never", "prompt": "p"}))
        .await;
    stack.add_worker().await;
    stack.wait_finished(&other, WAIT).await;
    let run = stack.run(&id).await;
    assert_eq!(run["status"], "cancelled");
    assert!(run["startedAt"].is_null(), "never started: {run}");
    let logs = stack.logs(&id).await;
    assert!(logs.iter().all(|l| l["type"] != "agent"), "{logs:?}");
    assert!(
        !logs
            .iter()
            .any(|l| l["message"].as_str().is_some_and(|m| m.contains("claimed")))
    );
}

async fn sse_resume_at_every_event_gives_exactly_the_rest(db: Db) {
    let stack = Stack::start(db, StackOptions::default()).await;
    stack
        .create_agent(
            "lines",
            json!({"command": ["sh", "-c", "for i in 1 2 3 4 5; do echo line $i; done"]}),
        )
        .await;
    let id = stack
        .create_run(0, json!({"agent": "lines", "prompt": "p"}))
        .await;
    stack.wait_finished(&id, WAIT).await;
    let all = stack.events(0, &id, None).await;
    assert!(all.len() >= 9, "{all:?}");
    for (k, event) in all.iter().enumerate() {
        let resume = event.1.as_deref().expect("id");
        let rest = stack.events(0, &id, Some(resume)).await;
        assert_eq!(rest, all[k + 1..].to_vec(), "after {resume}");
    }
}

/// A run asking for more than any worker has is rejected at claim time with a
/// message saying why, instead of waiting forever.
async fn oversized_runs_are_rejected_at_claim(db: Db) {
    let stack = Stack::start(db, StackOptions::default()).await;
    stack
        .create_agent(
            "huge-cpu",
            json!({"command": ["true"], "resources": {"vcpus": 64}}),
        )
        .await;
    stack
        .create_agent(
            "huge-disk",
            json!({"command": ["true"], "resources": {"diskMb": 1_000_000}}),
        )
        .await;
    for agent in ["huge-cpu", "huge-disk"] {
        let id = stack
            .create_run(0, json!({"agent": agent, "prompt": "p"}))
            .await;
        let run = stack.wait_finished(&id, WAIT).await;
        assert_eq!(run["status"], "failed", "{run}");
        let error = run["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("more than worker") && error.contains("MB of disk"),
            "{run}"
        );
        assert!(run["startedAt"].is_null(), "it never started: {run}");
    }
}

vm0_db::on_both_databases!(
    oversized_runs_are_rejected_at_claim,
    run_completes_with_output_in_sse_logs_and_metrics,
    failing_command_ends_failed_with_its_exit_code,
    timeout_kills_the_run,
    cancel_of_a_running_run_ends_its_command_within_1s,
    cancel_of_a_pending_run_means_it_never_starts,
    sse_resume_at_every_event_gives_exactly_the_rest,
);

/// The worker runs as root here; the command must not: it runs as the run user,
/// with no capabilities, owning /work, with a /tmp it can write.
#[tokio::test]
async fn the_command_runs_unprivileged() {
    let stack = Stack::start(Db::Sqlite, StackOptions::default()).await;
    stack
        .create_agent(
            "who",
            json!({"command": ["sh", "-c", "id -u; id -g; whoami; grep CapEff /proc/self/status; \
                echo mine > /work/f && cat /work/f; echo t > /tmp/t && echo tmp-ok; \
                (echo x > /etc/x) 2>/dev/null || echo etc-refused"]}),
        )
        .await;
    let id = stack
        .create_run(0, json!({"agent": "who", "prompt": "p"}))
        .await;
    let run = stack.wait_finished(&id, WAIT).await;
    assert_eq!(run["status"], "completed", "{run}");
    let output: String = stack.output(&id).await;
    // A root worker (this harness's) runs each slot as a host uid of its own,
    // leased from VM0_SLOT_UIDS, never one of the host's users; it is `agent`.
    assert!(
        vm0_sandbox::slot_user::can_switch_uids(),
        "the e2e harness runs workers as root"
    );
    let ids: Vec<u32> = output
        .lines()
        .take(2)
        .filter_map(|l| l.parse().ok())
        .collect();
    let range = vm0_sandbox::slot_user::UidRange::default();
    assert_eq!(ids.len(), 2, "{output}");
    assert!(
        ids.iter().all(|id| (range.first..=range.last).contains(id)),
        "uid and gid from the slot range: {output}"
    );
    assert_eq!(output.lines().nth(2), Some("agent"), "whoami: {output}");
    assert!(
        output.contains("CapEff:\t0000000000000000\n"),
        "no capabilities: {output}"
    );
    assert!(output.ends_with("mine\ntmp-ok\netc-refused\n"), "{output}");
}

/// On bubblewrap the run's memory is its agent config's too: past it, the kernel
/// ends the run, and the run says so.
#[tokio::test]
async fn memory_beyond_the_limit_ends_the_run_out_of_memory() {
    if let Err(e) = vm0_sandbox::cgroup::Hierarchy::detect() {
        eprintln!("SKIPPED: bubblewrap runs get no resource limits on this host: {e}");
        return;
    }
    let stack = Stack::start(Db::Sqlite, StackOptions::default()).await;
    stack
        .create_agent(
            "hungry",
            json!({"command": ["sh", "-c", "echo filling; exec tail /dev/zero"], "resources": {"memoryMb": 128}}),
        )
        .await;
    let id = stack
        .create_run(0, json!({"agent": "hungry", "prompt": "p"}))
        .await;
    let run = stack.wait_finished(&id, WAIT).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(
        run["error"], "out of memory: the kernel killed the agent",
        "{run}"
    );
    let logs = stack.logs(&id).await;
    assert!(
        logs.iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.contains("limits: 128 MB memory, 1 vCPU, 4096 processes"))),
        "the run's log says its limits: {logs:?}"
    );
}

/// `"user": "root"` is for microVMs; bubblewrap refuses it rather than give a
/// command root on the host kernel.
#[tokio::test]
async fn root_on_bubblewrap_is_refused_with_the_reason() {
    let stack = Stack::start(Db::Sqlite, StackOptions::default()).await;
    stack
        .create_agent("rooted", json!({"command": ["id", "-u"], "user": "root"}))
        .await;
    let id = stack
        .create_run(0, json!({"agent": "rooted", "prompt": "p"}))
        .await;
    let run = stack.wait_finished(&id, WAIT).await;
    assert_eq!(run["status"], "failed", "{run}");
    let error = run["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("user \"root\" needs a microVM worker"),
        "{run}"
    );
}
