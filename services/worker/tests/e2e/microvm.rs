use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::harness::{Db, Stack, StackOptions};

/// A run through the gateway on a worker with the QEMU backend: a real microVM
/// boots (TCG here), the guest agent runs the command, output reaches SSE.
async fn qemu_backend_runs_through_the_gateway(db: Db) {
    assert!(
        std::env::var("VM0_GUEST_AGENT").is_ok(),
        "VM0_GUEST_AGENT is not set: run scripts/test.sh, which builds the static guest agent"
    );
    let stack = Stack::start(
        db,
        StackOptions {
            sandbox: "qemu",
            ..Default::default()
        },
    )
    .await;
    stack
        .create_agent(
            "vm",
            json!({"command": ["sh", "-c", "echo \"from-vm: $VM0_PROMPT\"; uname -s; exit 3"], "resources": {"memoryMb": 256}}),
        )
        .await;
    stack
        .create_agent(
            "vm-sleeper",
            json!({"command": ["sh", "-c", "echo up; sleep 600"], "resources": {"memoryMb": 256}}),
        )
        .await;
    let id = stack
        .create_run(0, json!({"agent": "vm", "prompt": "hi"}))
        .await;
    let run = stack.wait_finished(&id, Duration::from_secs(120)).await;
    let logs = stack.logs(&id).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["error"], "exited with code 3", "{logs:#?}");
    let events = stack.events(0, &id, None).await;
    let output: String = events
        .iter()
        .filter(|e| e.0 == "output")
        .map(|e| e.2["content"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(output, "from-vm: hi\nLinux\n");
    assert!(
        logs.iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.contains("backend qemu"))),
        "the backend is named in the run's system log: {logs:?}"
    );

    // Cancel a running VM.
    let id = stack
        .create_run(0, json!({"agent": "vm-sleeper", "prompt": "p"}))
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !stack.logs(&id).await.iter().any(|l| l["message"] == "up\n") {
        assert!(std::time::Instant::now() < deadline, "the VM never printed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let asked = std::time::Instant::now();
    let (status, run) = stack
        .call(0, Method::POST, &format!("/v1/runs/{id}/cancel"), None)
        .await;
    assert_eq!(status.as_u16(), 200, "{run}");
    assert_eq!(run["status"], "cancelled");
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "cancel took {:?}",
        asked.elapsed()
    );
}

vm0_db::on_both_databases!(qemu_backend_runs_through_the_gateway);
