//! The guest agent as the host sees it: the real binary on a pipe, framed protobuf
//! both ways.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use vm0_proto::frame;
use vm0_proto::guest::{
    Cancel, Exited, GuestMessage, HostMessage, OutputStream, Ping, ReadFile, Start, WriteFile,
    guest_message::Kind as G, host_message::Kind as H,
};

struct Guest {
    _child: Child,
    to: ChildStdin,
    from: ChildStdout,
}

impl Guest {
    async fn spawn() -> Guest {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vm0-guest-agent"))
            .arg("--stdio")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn guest agent");
        let mut g = Guest {
            to: child.stdin.take().expect("stdin"),
            from: child.stdout.take().expect("stdout"),
            _child: child,
        };
        match g.recv().await {
            Some(G::Ready(r)) => assert!(!r.version.is_empty()),
            other => panic!("expected Ready, got {other:?}"),
        }
        g
    }

    async fn send(&mut self, kind: H) {
        frame::write(&mut self.to, &HostMessage { kind: Some(kind) })
            .await
            .expect("send");
    }

    async fn recv(&mut self) -> Option<G> {
        tokio::time::timeout(
            Duration::from_secs(20),
            frame::read::<GuestMessage, _>(&mut self.from),
        )
        .await
        .expect("guest answered in time")
        .expect("well-formed frame")
        .and_then(|m| m.kind)
    }

    /// Collects output per stream and samples until Exited.
    async fn until_exit(&mut self) -> (String, String, usize, Exited, Vec<String>) {
        let (mut out, mut err, mut samples, mut errors) = (Vec::new(), Vec::new(), 0, Vec::new());
        let mut next_seq: Option<u64> = None;
        loop {
            match self.recv().await {
                Some(G::Output(o)) => {
                    if let Some(expected) = next_seq {
                        assert_eq!(o.seq, expected, "output numbered without gaps");
                    }
                    next_seq = Some(o.seq + 1);
                    match OutputStream::try_from(o.stream) {
                        Ok(OutputStream::Stdout) => out.extend(o.data),
                        _ => err.extend(o.data),
                    }
                }
                Some(G::Sample(_)) => samples += 1,
                Some(G::Error(e)) => errors.push(e.message),
                Some(G::Exited(x)) => {
                    return (
                        String::from_utf8_lossy(&out).into(),
                        String::from_utf8_lossy(&err).into(),
                        samples,
                        x,
                        errors,
                    );
                }
                Some(other) => panic!("unexpected {other:?}"),
                None => panic!("stream ended before Exited"),
            }
        }
    }
}

fn start(argv: &[&str]) -> Start {
    Start {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: HashMap::from([
            ("PATH".to_owned(), "/usr/bin:/bin".to_owned()),
            ("GREETING".to_owned(), "hi".to_owned()),
        ]),
        working_dir: String::new(),
        stdin: b"prompt text".to_vec(),
        sample_interval_ms: 0,
        as_root: false,
        stdin_path: String::new(),
    }
}

#[tokio::test]
async fn runs_a_command_and_reports_its_exit() {
    let mut g = Guest::spawn().await;
    g.send(H::Ping(Ping { nonce: 42 })).await;
    assert!(matches!(g.recv().await, Some(G::Pong(p)) if p.nonce == 42));
    g.send(H::Start(start(&[
        "sh",
        "-c",
        "echo $GREETING; cat; echo; echo oops >&2; exit 3",
    ])))
    .await;
    let (out, err, _, exited, errors) = g.until_exit().await;
    assert_eq!(out, "hi\nprompt text\n");
    assert_eq!(err, "oops\n");
    assert_eq!(exited.code, Some(3));
    assert!(errors.is_empty(), "{errors:?}");
}

#[tokio::test]
async fn cancel_sends_sigterm_then_sigkill_after_the_grace() {
    let mut g = Guest::spawn().await;
    g.send(H::Start(start(&[
        "sh",
        "-c",
        "trap 'echo got-term; exit 143' TERM; echo ready; while true; do sleep 0.05; done",
    ])))
    .await;
    assert!(matches!(g.recv().await, Some(G::Output(o)) if o.data == b"ready\n"));
    g.send(H::Cancel(Cancel { grace_ms: 5000 })).await;
    let (out, _, _, exited, _) = g.until_exit().await;
    assert!(out.contains("got-term"), "{out}");
    assert_eq!(
        exited.code,
        Some(143),
        "the command exited by itself on SIGTERM"
    );

    let mut g = Guest::spawn().await;
    g.send(H::Start(start(&[
        "sh",
        "-c",
        "trap '' TERM; echo ready; sleep 100",
    ])))
    .await;
    assert!(matches!(g.recv().await, Some(G::Output(_))));
    let asked = std::time::Instant::now();
    g.send(H::Cancel(Cancel { grace_ms: 300 })).await;
    let (_, _, _, exited, _) = g.until_exit().await;
    assert_eq!(exited.signal, Some(9), "killed after the grace: {exited:?}");
    assert!(asked.elapsed() < Duration::from_secs(5));
    assert!(!exited.oom_killed);
}

#[tokio::test]
async fn samples_arrive_while_running() {
    let mut g = Guest::spawn().await;
    let mut s = start(&["sleep", "0.5"]);
    s.sample_interval_ms = 100;
    g.send(H::Start(s)).await;
    let (_, _, samples, exited, _) = g.until_exit().await;
    assert!(samples >= 3, "{samples} samples");
    assert_eq!(exited.code, Some(0));
}

#[tokio::test]
async fn a_missing_program_is_reported() {
    let mut g = Guest::spawn().await;
    g.send(H::Start(start(&["/no/such/program"]))).await;
    let (_, _, _, exited, errors) = g.until_exit().await;
    assert_eq!(exited.code, Some(127));
    assert!(
        errors.iter().any(|e| e.contains("/no/such/program")),
        "{errors:?}"
    );
}

#[tokio::test]
async fn garbage_from_the_host_is_refused_clearly() {
    let mut g = Guest::spawn().await;
    g.to.write_all(&[0xff, 0xff, 0xff, 0xff])
        .await
        .expect("write");
    g.to.flush().await.expect("flush");
    match g.recv().await {
        Some(G::Error(e)) => assert!(e.message.contains("exceeds"), "{}", e.message),
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test]
async fn files_move_before_start_and_after_exit() {
    let dir = tempfile::tempdir().expect("dir");
    // Like a sandbox's /work: the run user's (when these tests run as root).
    if running_as_root() {
        std::os::unix::fs::chown(dir.path(), Some(1000), Some(1000)).expect("chown");
    }
    let input = dir.path().join("in/prompt.txt");
    let output = dir.path().join("out.bin");
    let path = |p: &std::path::Path| p.display().to_string();
    let mut g = Guest::spawn().await;

    // An input in two parts; the parent directory is created.
    for (data, append, size) in [(&b"hello "[..], false, 6), (&b"world"[..], true, 11)] {
        g.send(H::WriteFile(WriteFile {
            path: path(&input),
            data: data.to_vec(),
            append,
            mode: 0o600,
        }))
        .await;
        match g.recv().await {
            Some(G::FileWritten(w)) => {
                assert_eq!((w.path.as_str(), w.size), (path(&input).as_str(), size))
            }
            other => panic!("expected FileWritten, got {other:?}"),
        }
    }
    // Relative paths are refused.
    g.send(H::WriteFile(WriteFile {
        path: "rel.txt".into(),
        data: vec![1],
        append: false,
        mode: 0,
    }))
    .await;
    assert!(matches!(g.recv().await, Some(G::Error(e)) if e.message.contains("must be absolute")));

    // The command reads the input and writes an output larger than one part.
    let script = format!(
        "cat {}; head -c 600000 /dev/zero | tr '\\0' x > {}",
        path(&input),
        path(&output)
    );
    g.send(H::Start(start(&["sh", "-c", &script]))).await;
    let (out, _, _, exited, errors) = g.until_exit().await;
    assert_eq!(out, "hello world");
    assert_eq!(exited.code, Some(0), "{errors:?}");

    // After Exited the agent still serves files: the output comes back whole.
    g.send(H::ReadFile(ReadFile {
        path: path(&output),
    }))
    .await;
    let mut data = Vec::new();
    let mut parts = 0;
    loop {
        match g.recv().await {
            Some(G::FileData(d)) => {
                parts += 1;
                data.extend(d.data);
                if d.eof {
                    break;
                }
            }
            other => panic!("expected FileData, got {other:?}"),
        }
    }
    assert_eq!(data.len(), 600_000);
    assert!(data.iter().all(|b| *b == b'x'));
    assert!(parts >= 3, "sent in bounded parts: {parts}");
    g.send(H::ReadFile(ReadFile {
        path: path(&dir.path().join("missing")),
    }))
    .await;
    assert!(matches!(g.recv().await, Some(G::Error(e)) if e.message.contains("missing")));
    // A second Start is refused.
    g.send(H::Start(start(&["true"]))).await;
    assert!(matches!(g.recv().await, Some(G::Error(e)) if e.message.contains("expected")));
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The command's ids and effective capabilities, as it sees them.
async fn identity(as_root: bool) -> String {
    let mut g = Guest::spawn().await;
    let mut s = start(&["sh", "-c", "id -u; id -g; grep CapEff /proc/self/status"]);
    s.as_root = as_root;
    g.send(H::Start(s)).await;
    let (out, _, _, exited, errors) = g.until_exit().await;
    assert_eq!(exited.code, Some(0), "{errors:?}");
    out
}

#[tokio::test]
async fn a_root_agent_runs_the_command_as_the_unprivileged_run_user() {
    if !running_as_root() {
        eprintln!("SKIPPED: these tests do not run as root, so the agent cannot drop privileges");
        return;
    }
    assert_eq!(
        identity(false).await,
        "1000\n1000\nCapEff:\t0000000000000000\n"
    );
    // Unless the host asks for root.
    assert!(identity(true).await.starts_with("0\n0\n"));
}
