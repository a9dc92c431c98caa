use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::harness::{Db, Stack, StackOptions, processes_with};

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
            json!({"command": ["sh", "-c", "echo \"from-vm: $VM0_PROMPT\"; uname -s; id -u; exit 3"], "resources": {"memoryMb": 256}}),
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
    assert_eq!(output, "from-vm: hi\nLinux\n1000\n", "the run user runs it");
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
    wait_for_output(&stack, &id, "up\n").await;
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

/// Waits until the run's persisted logs contain `line`.
async fn wait_for_output(stack: &Stack, id: &str, line: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !stack.logs(id).await.iter().any(|l| l["message"] == line) {
        assert!(
            std::time::Instant::now() < deadline,
            "the VM never printed {line:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A run's metrics once at least one sample is stored.
async fn metrics_of(stack: &Stack, id: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = stack.get(&format!("/v1/runs/{id}/metrics")).await;
        if m["summary"]["sampleCount"].as_i64().unwrap_or(0) >= 1 {
            return m;
        }
        assert!(std::time::Instant::now() < deadline, "no metrics: {m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every way a run in a VM ends, one run after the other (TCG guests on two cores
/// are happiest alone): metrics from inside the guest, timeout, out of memory, and
/// the worker killed with SIGKILL taking its VMM with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_runs_end_in_every_way() {
    assert!(
        std::env::var("VM0_GUEST_AGENT").is_ok(),
        "VM0_GUEST_AGENT is not set: run scripts/test.sh, which builds the static guest agent"
    );
    let mut stack = Stack::start(
        Db::Sqlite,
        StackOptions {
            sandbox: "qemu",
            worker_slots: 1,
            worker_lost_after: Duration::from_secs(2),
            ..Default::default()
        },
    )
    .await;
    for (name, config) in [
        (
            "sampled",
            json!({"command": ["sh", "-c", "echo hi; sleep 2"], "resources": {"memoryMb": 256, "diskMb": 300}}),
        ),
        (
            "slow",
            json!({"command": ["sh", "-c", "echo up; sleep 600"], "resources": {"memoryMb": 256}, "timeoutSeconds": 8}),
        ),
        (
            "hungry",
            json!({"command": ["sh", "-c", "echo filling; exec tail /dev/zero"], "resources": {"memoryMb": 192}}),
        ),
        (
            "sleeper",
            json!({"command": ["sh", "-c", "echo up; sleep 600"], "resources": {"memoryMb": 256}}),
        ),
        (
            "elsewhere",
            json!({"command": ["true"], "image": "never-built:1"}),
        ),
        (
            "reader",
            json!({"command": ["sh", "-c", "echo stdin=$(wc -c | tr -d ' ') file=$(wc -c < \"$VM0_PROMPT_FILE\" | tr -d ' ') env=${#VM0_PROMPT}"]}),
        ),
    ] {
        stack.create_agent(name, config).await;
    }

    // An image this worker does not have: a clear failure, not a hang.
    let id = stack
        .create_run(0, json!({"agent": "elsewhere", "prompt": "p"}))
        .await;
    let run = stack.wait_finished(&id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert!(
        run["error"]
            .as_str()
            .is_some_and(|e| e.contains("\"never-built:1\" is not built on this worker")),
        "{run}"
    );

    // A prompt larger than an environment string may be reaches the guest too.
    let id = stack
        .create_run(
            0,
            json!({"agent": "reader", "prompt": "y".repeat(200 * 1024)}),
        )
        .await;
    let run = stack.wait_finished(&id, Duration::from_secs(120)).await;
    assert_eq!(run["status"], "completed", "{}", run["error"]);
    let out: String = stack.output(&id).await;
    assert_eq!(out, format!("stdin={0} file={0} env=0\n", 200 * 1024));
    // A run over before the first periodic sample still has its last one.
    metrics_of(&stack, &id).await;

    // Metrics come from inside the guest: its memory, not the host's.
    let id = stack
        .create_run(0, json!({"agent": "sampled", "prompt": "p"}))
        .await;
    let run = stack.wait_finished(&id, Duration::from_secs(120)).await;
    assert_eq!(
        run["status"],
        "completed",
        "{run} {:?}",
        stack.logs(&id).await
    );
    let metrics = metrics_of(&stack, &id).await;
    let total = metrics["data"][0]["memoryTotalMb"].as_i64().unwrap_or(0);
    assert!(
        (100..=256).contains(&total),
        "guest memory, not the host's: {metrics}"
    );
    // The agent's disk is the size of its /work.
    assert_eq!(metrics["data"][0]["diskTotalMb"], 300, "{metrics}");

    // Timeout.
    let id = stack
        .create_run(0, json!({"agent": "slow", "prompt": "p"}))
        .await;
    let run = stack.wait_finished(&id, Duration::from_secs(120)).await;
    assert_eq!(run["status"], "timeout", "{run}");
    assert_eq!(processes_with(&id), 0, "the VMM of a timed-out run is gone");

    // Out of memory inside the guest.
    let id = stack
        .create_run(0, json!({"agent": "hungry", "prompt": "p"}))
        .await;
    let run = stack.wait_finished(&id, Duration::from_secs(120)).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(
        run["error"], "out of memory: the kernel killed the agent",
        "{run}"
    );

    // Cancel: the worker confirms it (no forced cancel at VM0_CANCEL_WAIT_MS)
    // and the VM is gone within a second of the request.
    let id = stack
        .create_run(0, json!({"agent": "sleeper", "prompt": "p"}))
        .await;
    wait_for_output(&stack, &id, "up\n").await;
    let vmm = crate::harness::process_trees_matching(&id);
    let asked = std::time::Instant::now();
    let (status, run) = stack
        .call(0, Method::POST, &format!("/v1/runs/{id}/cancel"), None)
        .await;
    let answered = asked.elapsed();
    assert!(status.is_success(), "{status} {run}");
    assert_eq!(run["status"], "cancelled", "{run}");
    // A zombie is dead (whoever reaps it: an orphaned jail's pid 1 goes to
    // the machine's init).
    let alive = || {
        vmm.iter()
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
                    s.rsplit(')')
                        .next()
                        .is_some_and(|r| !r.trim_start().starts_with('Z'))
                })
            })
            .count()
    };
    while alive() > 0 && asked.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let gone = asked.elapsed();
    eprintln!("qemu cancel: answered in {answered:?}, the VM gone after {gone:?}");
    let logs = stack.logs(&id).await;
    assert!(
        logs.iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m == "run cancelled: cancelled by user")),
        "the worker confirmed the cancel: {logs:?}"
    );
    assert!(
        gone < Duration::from_secs(1),
        "the VM outlived its cancel by {gone:?}"
    );

    // The worker dies with SIGKILL mid-run: its VMM dies with it.
    let id = stack
        .create_run(0, json!({"agent": "sleeper", "prompt": "p"}))
        .await;
    wait_for_output(&stack, &id, "up\n").await;
    // The VMM's jail (bwrap, named after the run's directory) and what runs in it.
    let vmm = crate::harness::process_trees_matching(&id);
    assert!(
        vmm.iter()
            .any(|p| crate::harness::is_program(*p, "qemu-system")),
        "a VMM runs the run: {vmm:?}"
    );
    stack.workers[0].kill_9();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let alive = || {
        vmm.iter()
            .filter(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
            .count()
    };
    while alive() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(alive(), 0, "the VMM or its jail outlived its worker");
    let run = stack.wait_finished(&id, Duration::from_secs(30)).await;
    assert_eq!(run["error"], "worker_lost", "{run}");
}
