//! The `vm0` CLI as a user drives it: the real binary against a real local
//! stack (`vm0 dev`, which logs it in), over HTTP only.

mod stack;

use std::time::Duration;

use stack::{Relay, Stack, interrupt, text};
use tokio::io::{AsyncBufReadExt, BufReader};

const COUNTER: &str = r#"
name: counter
config:
  command: ["sh", "-c", "for i in 1 2 3; do echo line $i; sleep 0.2; done; echo to-stderr >&2; exit ${EXIT:-0}"]
  timeoutSeconds: 60
"#;

/// 20 lines over about 5 s.
const SLOW: &str = r#"
name: slow
config:
  command: ["sh", "-c", "i=1; while [ $i -le 20 ]; do echo line $i; i=$((i+1)); sleep 0.25; done"]
  timeoutSeconds: 120
"#;

const SLEEPER: &str = r#"
name: sleeper
config:
  command: ["sh", "-c", "echo started; sleep 60"]
  timeoutSeconds: 1
"#;

fn expected_lines(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("line {i}")).collect()
}

/// The id in `run <id> of …`, the first line `vm0 run --follow` writes to stderr.
fn run_id_in(stderr: &str) -> String {
    stderr
        .split_whitespace()
        .find(|w| w.starts_with("run_"))
        .unwrap_or_else(|| panic!("no run id in {stderr}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_apply_and_runs_follow_to_their_outcome() {
    let stack = Stack::start().await;

    // `vm0 dev` logged the CLI in.
    assert_eq!(stack.ok(&["auth", "setup-token"]).await.trim(), stack.key);

    // A config the server refuses: its message, field, code and request id; exit 1.
    let bad = stack.write(
        "bad.yaml",
        "name: bad\nconfig:\n  command: [\"true\"]\n  timeoutSeconds: 0\n",
    );
    let out = stack
        .output(&["agents", "apply", "-f", bad.to_str().expect("utf-8")])
        .await;
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    for part in [
        "field config.timeoutSeconds",
        "code invalid_parameter",
        "HTTP 400",
        "request id req_",
    ] {
        assert!(err.contains(part), "{part:?} missing from: {err}");
    }
    let out = stack
        .output(&["agents", "apply", "-f", "missing.yaml"])
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("missing.yaml"),
        "{}",
        text(&out.stderr)
    );

    // Create, apply again (no new version), change (a new version).
    stack.write("vm0.yaml", COUNTER);
    let created = stack.json(&["agents", "apply"]).await;
    assert_eq!(created["action"], "created", "{created}");
    let again = stack.json(&["agents", "apply", "-f", "vm0.yaml"]).await;
    assert_eq!(again["action"], "unchanged", "{again}");
    assert_eq!(
        again["agent"]["currentVersionId"],
        created["agent"]["currentVersionId"]
    );
    stack.write(
        "vm0.yaml",
        &COUNTER.replace("timeoutSeconds: 60", "timeoutSeconds: 61"),
    );
    let updated = stack.json(&["agents", "apply"]).await;
    assert_eq!(updated["action"], "updated", "{updated}");
    assert_ne!(
        updated["agent"]["currentVersionId"],
        created["agent"]["currentVersionId"]
    );
    let versions = stack.json(&["agents", "versions", "counter"]).await;
    assert_eq!(versions.as_array().map(Vec::len), Some(2), "{versions}");
    let human = stack.ok(&["agents", "ls"]).await;
    assert!(human.starts_with("NAME"), "a table: {human}");
    assert!(
        human.contains("counter") && human.contains("example"),
        "{human}"
    );
    assert!(!human.contains('\x1b'), "no colours when piped: {human:?}");
    // `agents get` prints a vm0.yaml that applies as is.
    let yaml = stack.ok(&["agents", "get", "counter"]).await;
    stack.write("roundtrip.yaml", &yaml);
    assert_eq!(
        stack
            .json(&["agents", "apply", "-f", "roundtrip.yaml"])
            .await["action"],
        "unchanged",
        "{yaml}"
    );
    for manifest in [SLOW, SLEEPER] {
        stack.write("vm0.yaml", manifest);
        stack.ok(&["agents", "apply"]).await;
    }

    // Outcomes are exit codes: completed 0, failed 3, timeout 4.
    let out = stack.output(&["run", "counter", "hi", "--follow"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "line 1\nline 2\nline 3\n");
    let err = text(&out.stderr);
    assert!(
        err.contains("to-stderr"),
        "the agent's stderr on stderr: {err}"
    );
    assert!(err.contains("completed"), "{err}");
    let completed = run_id_in(&err);
    let out = stack
        .output(&["run", "counter", "hi", "--var", "EXIT=7", "-f"])
        .await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("exit code 7"),
        "{}",
        text(&out.stderr)
    );
    let failed = run_id_in(&text(&out.stderr));
    let out = stack.output(&["run", "sleeper", "x", "--follow"]).await;
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));

    // --json: one JSON object per event, ending with complete.
    let out = stack
        .output(&["--json", "run", "counter", "hi", "-f"])
        .await;
    assert_eq!(out.status.code(), Some(0));
    let events: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(
        events.last().map(|e| e["event"].clone()),
        Some("complete".into())
    );
    assert_eq!(
        events.iter().filter(|e| e["event"] == "output").count(),
        4,
        "{events:?}"
    );

    // The connection drops mid-run: the CLI reconnects after the last event it
    // saw, and the output is whole, in order, each line once.
    let relay = Relay::start(&stack.url).await;
    let mut follow = stack.vm0(&["run", "slow", "go", "--follow"]);
    follow.env("VM0_API_URL", relay.url());
    let mut child = follow.spawn().expect("vm0 run");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut seen = Vec::new();
    let read_all = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = stdout.next_line().await {
            seen.push(line);
            if seen.len() == 5 || seen.len() == 12 {
                relay.cut();
            }
        }
    })
    .await;
    assert!(read_all.is_ok(), "the run's output did not end: {seen:?}");
    let out = child.wait_with_output().await.expect("vm0 ran");
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(seen, expected_lines(20), "{err}");
    assert_eq!(err.matches("reconnecting after evt_").count(), 2, "{err}");
    let reconnected = run_id_in(&err);

    // Stopped by a CI job (SIGINT, stdin not a terminal): the run is cancelled, exit 5.
    let mut child = stack
        .vm0(&["run", "slow", "stop me", "--follow"])
        .spawn()
        .expect("vm0 run");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), stdout.next_line()).await;
    assert!(matches!(first, Ok(Ok(Some(_)))), "{first:?}");
    interrupt(&child);
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("ends after SIGINT")
        .expect("vm0 ran");
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains("cancelling run"), "{err}");

    // Without --follow: the id, then `runs cancel`, `runs get`, `runs events`.
    let run = stack.json(&["run", "slow", "later"]).await;
    let id = run["id"].as_str().expect("id").to_owned();
    let plain = stack.ok(&["run", "counter", "plain"]).await;
    assert!(
        plain.trim().starts_with("run_"),
        "the id alone on stdout: {plain}"
    );
    let cancelled = stack.json(&["runs", "cancel", &id]).await;
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    assert_eq!(
        stack.json(&["runs", "get", &id]).await["status"],
        "cancelled"
    );
    let out = stack.output(&["runs", "cancel", &id]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("code invalid_state"),
        "{}",
        text(&out.stderr)
    );
    let out = stack.output(&["runs", "events", &id]).await;
    assert_eq!(
        out.status.code(),
        Some(5),
        "replayed to the end: {}",
        text(&out.stderr)
    );
    let out = stack.output(&["runs", "events", &completed]).await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out.stdout), "line 1\nline 2\nline 3\n");

    // runs ls with filters.
    let failed_runs = stack.json(&["runs", "ls", "--status", "failed"]).await;
    let failed_ids: Vec<&str> = failed_runs
        .as_array()
        .expect("array")
        .iter()
        .map(|r| r["id"].as_str().expect("id"))
        .collect();
    assert_eq!(failed_ids, vec![failed.as_str()]);
    let slow_runs = stack
        .json(&["runs", "ls", "--agent", "slow", "--since", "1h"])
        .await;
    assert_eq!(slow_runs.as_array().map(Vec::len), Some(3), "{slow_runs}");
    assert!(
        slow_runs
            .as_array()
            .expect("array")
            .iter()
            .all(|r| r["agentName"] == "slow")
    );
    let none = stack
        .json(&["runs", "ls", "--since", "2999-01-01T00:00:00Z"])
        .await;
    assert_eq!(none, serde_json::json!([]));
    let out = stack.output(&["runs", "ls", "--status", "sideways"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("field status"),
        "{}",
        text(&out.stderr)
    );

    // Logs: filtered, as JSON lines; followed until a run ends.
    let out = stack
        .ok(&["--json", "runs", "logs", &completed, "--type", "agent"])
        .await;
    let messages: Vec<String> = out
        .lines()
        .map(|l| {
            let entry: serde_json::Value = serde_json::from_str(l).expect("JSON line");
            assert_eq!(entry["type"], "agent");
            entry["message"]
                .as_str()
                .expect("message")
                .trim()
                .to_owned()
        })
        .collect();
    assert_eq!(messages, ["line 1", "line 2", "line 3", "to-stderr"]);
    let run = stack.json(&["run", "slow", "watch logs"]).await;
    let id = run["id"].as_str().expect("id").to_owned();
    let out = stack
        .ok(&["runs", "logs", &id, "--type", "agent", "--follow"])
        .await;
    let lines: Vec<String> = out
        .lines()
        .map(|l| l.rsplit("  ").next().unwrap_or(l).trim().to_owned())
        .collect();
    assert_eq!(lines, expected_lines(20), "{out}");

    // Metrics: the summary, and a chart that is a PNG with something drawn.
    let png = stack.dir.path().join("metrics.png");
    let metrics = stack
        .json(&[
            "runs",
            "metrics",
            &reconnected,
            "--plot",
            png.to_str().expect("utf-8"),
        ])
        .await;
    let samples = metrics["summary"]["sampleCount"].as_i64().expect("count");
    assert!(samples >= 5, "a 5 s run sampled every 200 ms: {metrics}");
    assert_eq!(
        metrics["data"].as_array().map(Vec::len),
        Some(samples as usize)
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&png).expect("the PNG exists"),
    ));
    let mut reader = decoder.read_info().expect("a valid PNG");
    let mut pixels = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut pixels).expect("decodes");
    assert_eq!((info.width, info.height), (1000, 900));
    let coloured = pixels
        .chunks(3)
        .filter(|p| p[0] != p[1] || p[1] != p[2])
        .count();
    assert!(
        coloured > 1000,
        "the series are drawn in colour: {coloured} pixels"
    );

    // Completions for the shells clap_complete knows.
    for shell in ["bash", "zsh", "fish"] {
        let script = stack.ok(&["completion", shell]).await;
        assert!(
            script.contains("volumes") && script.contains("setup-token"),
            "{shell}"
        );
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_and_artifacts_push_and_pull_whole_directories() {
    let stack = Stack::start().await;
    let src = stack.dir.path().join("src");
    std::fs::create_dir_all(src.join("a/b/c")).expect("dirs");
    std::fs::write(src.join("top.txt"), "top\n").expect("write");
    std::fs::write(src.join("a/b/c/deep.txt"), "deep\n").expect("write");
    std::fs::write(src.join("a/empty"), "").expect("write");
    let big: Vec<u8> = (0..6 * 1024 * 1024u32)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    std::fs::write(src.join("a/big.bin"), &big).expect("write");
    std::os::unix::fs::symlink("b/c/deep.txt", src.join("a/link")).expect("link");
    let src_str = src.to_str().expect("utf-8");

    for kind in ["volumes", "artifacts"] {
        let pushed = stack
            .json(&[kind, "push", src_str, "data", "-m", "first"])
            .await;
        assert_eq!(pushed["new"], true, "{pushed}");
        let version = pushed["version"]["id"].as_str().expect("id").to_owned();
        assert_eq!(pushed["version"]["fileCount"], 5, "{pushed}");
        assert_eq!(pushed["version"]["message"], "first");
        // The same content again is the same version.
        let again = stack.json(&[kind, "push", src_str, "data"]).await;
        assert_eq!(again["new"], false);
        assert_eq!(again["version"]["id"], version.as_str());

        let dest = stack.dir.path().join(format!("pulled-{kind}"));
        let pulled = stack
            .json(&[kind, "pull", "data", dest.to_str().expect("utf-8")])
            .await;
        assert_eq!(pulled["versionId"], version.as_str());
        assert_eq!(
            stack::tree(&dest),
            stack::tree(&src),
            "{kind}: the same tree"
        );

        // By version prefix, after a change.
        std::fs::write(src.join("top.txt"), "changed\n").expect("write");
        let second = stack.json(&[kind, "push", src_str, "data"]).await;
        assert_eq!(second["new"], true);
        let old = stack.dir.path().join(format!("old-{kind}"));
        let spec = format!("data:{}", &version[..10]);
        stack
            .ok(&[kind, "pull", &spec, old.to_str().expect("utf-8")])
            .await;
        assert_eq!(
            std::fs::read_to_string(old.join("top.txt")).expect("read"),
            "top\n"
        );
        std::fs::write(src.join("top.txt"), "top\n").expect("write");

        let listed = stack.json(&[kind, "ls"]).await;
        assert_eq!(listed[0]["name"], "data", "{listed}");
        let versions = stack.json(&[kind, "versions", "data"]).await;
        assert_eq!(versions.as_array().map(Vec::len), Some(2), "{versions}");
        let human = stack.ok(&[kind, "versions", "data"]).await;
        assert!(human.contains("first"), "{human}");
        let out = stack.output(&[kind, "pull", "nothing-here", "x"]).await;
        assert_eq!(out.status.code(), Some(1));
    }

    // A run reads the pushed volume.
    stack.write(
        "vm0.yaml",
        "name: reader\nconfig:\n  command: [\"sh\", \"-c\", \"cat /volumes/data/a/link; wc -c < /volumes/data/a/big.bin\"]\n",
    );
    stack.ok(&["agents", "apply"]).await;
    let out = stack
        .output(&["run", "reader", "read", "--volume", "data", "--follow"])
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("deep\n{}\n", big.len()));

    // A pulled version cannot write outside its directory through a link.
    let trap = stack.dir.path().join("trap");
    std::fs::create_dir_all(&trap).expect("dir");
    std::os::unix::fs::symlink("/tmp", trap.join("a")).expect("link");
    let out = stack
        .output(&["volumes", "pull", "data", trap.to_str().expect("utf-8")])
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("symbolic link"),
        "{}",
        text(&out.stderr)
    );
    assert!(!std::path::Path::new("/tmp/b/c/deep.txt").exists());

    stack.stop().await;
}

/// At a terminal, Ctrl-C asks before cancelling: `n` goes on following, `y`
/// cancels the run and `vm0` exits with the cancelled run's code (5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_at_a_terminal_asks_before_cancelling() {
    let stack = Stack::start().await;
    let yaml = stack.write(
        "waiter.yaml",
        "name: waiter\nconfig:\n  command: [\"sh\", \"-c\", \"echo started; sleep 60\"]\n  timeoutSeconds: 120\n",
    );
    stack
        .ok(&["agents", "apply", "-f", &yaml.to_string_lossy()])
        .await;
    let steps = serde_json::json!([
        ["expect", "started"],
        ["type", "\u{3}"],
        ["expect", "[y/N]"],
        ["type", "n\n"],
        ["expect", "still following"],
        ["type", "\u{3}"],
        ["expect", "[y/N]"],
        ["type", "y\n"],
        ["expect", "cancelling run"],
    ]);
    let driver = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/terminal/drive.py");
    let out = tokio::process::Command::new("python3")
        .arg(driver)
        .arg(steps.to_string())
        .args([
            env!("CARGO_BIN_EXE_vm0"),
            "run",
            "waiter",
            "wait",
            "--follow",
        ])
        .current_dir(stack.dir.path())
        .env("XDG_CONFIG_HOME", stack.config_home())
        .env("NO_COLOR", "1")
        .env_remove("VM0_API_URL")
        .env_remove("VM0_API_KEY")
        .output()
        .await
        .expect("python3 runs the terminal driver");
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let played: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the driver's JSON");
    let shown = played["output"].as_str().unwrap_or_default();
    assert_eq!(played["exit"], 5, "the cancelled run's exit code:\n{shown}");
    assert_eq!(shown.matches("[y/N]").count(), 2, "{shown}");
    let id = run_id_in(shown);
    assert_eq!(
        stack.json(&["runs", "get", &id]).await["status"],
        "cancelled",
        "{shown}"
    );
    stack.stop().await;
}
