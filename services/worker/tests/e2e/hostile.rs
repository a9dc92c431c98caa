//! The hostile-agent conformance suite: what an agent's command tries against
//! its sandbox, run through the whole stack on every backend this machine runs
//! (bubblewrap under a root worker and under an unprivileged one, QEMU). Each
//! probe must be refused or contained, and the worker must survive them all.
//!
//! - read every `/proc/*/environ`: nothing of the worker (its credential, its
//!   NATS password, a canary in its environment);
//! - new user and mount namespaces, `mount`, `keyctl`, `bpf`: refused;
//! - the gateway's, the control plane's and NATS's ports: unreachable;
//! - another run's processes: invisible and unsignalable;
//! - a fork bomb, and filling `/tmp` and `/work`: contained;
//! - afterwards the worker still runs runs.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use vm0_bus::Role;

use crate::harness::{Db, Stack, StackOptions};

fn port(url: &str) -> String {
    url.rsplit(':')
        .next()
        .unwrap_or_default()
        .trim_end_matches('/')
        .to_owned()
}

async fn run_to_end(stack: &Stack, agent: &str, vars: Value, wait: Duration) -> (Value, String) {
    let id = stack
        .create_run(0, json!({"agent": agent, "prompt": "p", "variables": vars}))
        .await;
    let run = stack.wait_finished(&id, wait).await;
    let out = stack.output(&id).await;
    (run, out)
}

/// The probes, in POSIX sh for busybox and the host's shells alike.
const PROBE: &str = r#"
for f in /proc/[0-9]*/environ; do tr '\0' '\n' < "$f" 2>/dev/null; done > /tmp/environ
echo "environ-lines $(wc -l < /tmp/environ)"
grep -E 'VM0_|NATS|TOKEN|CANARY|KEY|PASSWORD' /tmp/environ | grep -v -E '^VM0_(PROMPT|PROMPT_FILE|RUN_ID|STATE_DIR)=' | sed 's/^/leak: /'
unshare -U true 2>/dev/null && echo "unshare -U: allowed"
unshare -m true 2>/dev/null && echo "unshare -m: allowed"
mkdir -p /tmp/m && mount -t tmpfs none /tmp/m 2>/dev/null && echo "mount: allowed"
/run/vm0-guest-agent probe --connect "127.0.0.1:$PORT_A" --connect "127.0.0.1:$PORT_B" --connect "127.0.0.1:$PORT_C"
echo probes-done
"#;

/// Other runs: what this one sees of them, and what its signals do.
const NEIGHBOUR: &str = r#"
seen=0
for c in /proc/[0-9]*/cmdline; do tr '\0' ' ' < "$c" 2>/dev/null | grep -q "$MARKER" && seen=$((seen+1)); done
echo "neighbours-seen $seen"
kill -9 "$TARGET" 2>/dev/null && echo "kill-target: delivered" || echo "kill-target: refused"
echo neighbour-done
"#;

const FILL: &str = r#"
dd if=/dev/zero of=/tmp/fill bs=1M count=100000 2>&1 | grep -o 'No space left on device' | head -1 | sed 's/^/tmp: /'
dd if=/dev/zero of=/work/fill bs=1M count=100000 2>&1 | grep -o 'No space left on device' | head -1 | sed 's/^/work: /'
echo "tmp-mb $(df -m /tmp | awk 'NR==2 {print $2}') work-mb $(df -m /work | awk 'NR==2 {print $2}')"
"#;

/// Runs the whole suite against the stack's single worker.
async fn conformance(options: StackOptions, backend: &str) {
    let canary = format!("canary-{}", crate::harness::marker("environ"));
    // This suite's own bomb (the suites of other backends may run beside it).
    // The top shell forks once, before any limit is near, then only loops:
    // a `sleep` would be a fork too, and a shell that cannot fork exits 2,
    // which would look like a bomb that never started.
    let bomb = format!(
        "bomb() {{ bomb | bomb & }}; bomb; while :; do :; done # {}",
        crate::harness::marker("bomb")
    );
    let mut options = options;
    options.worker_env.push(("VM0_E2E_CANARY", canary.clone()));
    options.worker_slots = options.worker_slots.max(2);
    let microvm = options.sandbox != "bubblewrap";
    let wait = if microvm {
        Duration::from_secs(120)
    } else {
        Duration::from_secs(30)
    };
    let mut stack = Stack::start(Db::Sqlite, options).await;
    let disk = 64;
    let resources = json!({"memoryMb": 256, "diskMb": disk});
    for (name, script, timeout) in [
        ("probe", PROBE, 60),
        ("neighbour", NEIGHBOUR, 60),
        ("fill", FILL, 60),
        ("bomb", bomb.as_str(), 5),
        // Every process it may signal (under an unprivileged worker, its own
        // guest agent too: it ends its own run, no other).
        ("killall", "kill -9 -1; sleep 1; echo after", 10),
    ] {
        stack
            .create_agent(
                name,
                json!({"command": ["sh", "-c", script], "resources": resources, "timeoutSeconds": timeout}),
            )
            .await;
    }
    let marker = crate::harness::marker("neighbour");
    stack
        .create_agent(
            "sleeper",
            json!({"command": ["sh", "-c", format!("echo up; sleep 300 # {marker}")], "resources": resources}),
        )
        .await;
    stack
        .create_agent(
            "ok",
            json!({"command": ["echo", "still-working"], "resources": resources}),
        )
        .await;

    // 1. The worker's environment and the host's kernel surface.
    let secrets = [
        canary.clone(),
        stack.workers[0].credential.clone(),
        stack
            .nats
            .options(Role::Worker)
            .credentials
            .map(|c| c.password)
            .unwrap_or_default(),
    ];
    // The gateway's API, its control plane, NATS.
    let vars = json!({
        "PORT_A": port(&stack.gateways[0].base),
        "PORT_B": port(&stack.gateways[0].grpc),
        "PORT_C": port(&stack.nats.options(Role::Gateway).url),
    });
    let (run, out) = run_to_end(&stack, "probe", vars, wait).await;
    eprintln!("{backend}, what the probe saw:\n{out}");
    assert_eq!(run["status"], "completed", "{backend}: {run}\n{out}");
    assert!(out.contains("probes-done"), "{backend}: {out}");
    for secret in &secrets {
        assert!(
            !out.contains(secret.as_str()),
            "{backend}: a worker secret leaked: {out}"
        );
    }
    assert!(
        !out.contains("leak: "),
        "{backend}: the worker's environment is visible: {out}"
    );
    assert!(!out.contains(": allowed"), "{backend}: {out}");
    for name in ["unshare-user", "unshare-mount", "mount", "keyctl", "bpf"] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(&format!("probe {name}: refused"))),
            "{backend}: {name} not refused: {out}"
        );
    }
    let connects: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("probe connect"))
        .collect();
    assert_eq!(connects.len(), 3, "{backend}: {out}");
    assert!(
        connects.iter().all(|l| l.contains(": refused")),
        "{backend}: a host port is reachable: {connects:?}"
    );

    // 2. Another run's processes: invisible, and signals do not reach them.
    let sleeper = stack
        .create_run(0, json!({"agent": "sleeper", "prompt": "p"}))
        .await;
    let deadline = tokio::time::Instant::now() + wait;
    while !stack
        .logs(&sleeper)
        .await
        .iter()
        .any(|l| l["message"] == "up\n")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{backend}: the sleeper never started"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its host pid, for the neighbour to aim at (a VM's guest pids are its own).
    let target = vm0_sandbox::sample::processes_matching(&marker);
    let target_pid = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&marker))
        })
        .unwrap_or(1);
    assert!(
        microvm || target >= 1,
        "{backend}: the sleeper's command runs on the host"
    );
    let (run, out) = run_to_end(
        &stack,
        "neighbour",
        json!({"MARKER": marker, "TARGET": target_pid.to_string()}),
        wait,
    )
    .await;
    assert!(
        out.contains("neighbours-seen 0"),
        "{backend}: another run's processes are visible: {out} ({run})"
    );
    assert!(out.contains("kill-target: refused"), "{backend}: {out}");
    let (run, _) = run_to_end(&stack, "killall", json!({}), wait).await;
    assert!(run["status"].is_string(), "{backend}: {run}");
    let sleeping = stack.run(&sleeper).await;
    assert_eq!(
        sleeping["status"], "running",
        "{backend}: the neighbour killed it: {sleeping}"
    );
    let (status, _) = stack
        .call(0, Method::POST, &format!("/v1/runs/{sleeper}/cancel"), None)
        .await;
    assert_eq!(status.as_u16(), 200);

    // 3. Filling /tmp and /work stops at their size.
    let (run, out) = run_to_end(&stack, "fill", json!({}), wait).await;
    assert_eq!(run["status"], "completed", "{backend}: {run}\n{out}");
    assert!(
        out.contains("tmp: No space left on device"),
        "{backend}: {out}"
    );
    assert!(
        out.contains("work: No space left on device"),
        "{backend}: {out}"
    );
    assert!(out.contains(&format!("work-mb {disk}")), "{backend}: {out}");
    if !microvm {
        assert!(out.contains(&format!("tmp-mb {disk}")), "{backend}: {out}");
    }

    // 4. A fork bomb ends with its run.
    let (run, out) = run_to_end(&stack, "bomb", json!({}), wait).await;
    eprintln!(
        "{backend}, the fork bomb: {} ({}), {} output lines",
        run["status"],
        run["error"],
        out.lines().count()
    );
    assert!(
        matches!(run["status"].as_str(), Some("timeout" | "failed")),
        "{backend}: {run}"
    );
    assert!(
        !(run["status"] == "failed" && run["error"] == "exited with code 2"),
        "{backend}: the bomb did not even start: {run}"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while vm0_sandbox::sample::processes_matching(&bomb) > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{backend}: bomb processes remain"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 5. The worker survived every probe and still runs runs.
    assert!(stack.workers[0].alive(), "{backend}: the worker died");
    let (run, out) = run_to_end(&stack, "ok", json!({}), wait).await;
    assert_eq!(run["status"], "completed", "{backend}: {run}");
    assert_eq!(out, "still-working\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bubblewrap_under_a_root_worker() {
    conformance(StackOptions::default(), "bubblewrap (root worker)").await;
}

/// As the Dockerfile's `USER vm0` or `vm0 dev` started by a normal user runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bubblewrap_under_an_unprivileged_worker() {
    conformance(
        StackOptions {
            worker_uid: Some(65534),
            ..Default::default()
        },
        "bubblewrap (unprivileged worker)",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_microvms() {
    conformance(
        StackOptions {
            sandbox: "qemu",
            ..Default::default()
        },
        "qemu",
    )
    .await;
}
