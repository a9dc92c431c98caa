//! A real local stack for CLI tests: `vm0 dev` itself (nats-server, a gateway
//! on SQLite, a bubblewrap worker), started from the binary under test, which
//! logs the CLI in as it does for users. And a TCP relay whose connections a
//! test can cut, to see the CLI reconnect.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

pub struct Stack {
    child: Option<Child>,
    pub url: String,
    pub key: String,
    pub dir: tempfile::TempDir,
}

impl Stack {
    pub async fn start() -> Stack {
        let dir = tempfile::tempdir().expect("dir");
        let log = std::fs::File::create(dir.path().join("dev.log")).expect("log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_vm0"))
            .arg("dev")
            .current_dir(dir.path())
            .env("XDG_CONFIG_HOME", dir.path().join("config"))
            .env("VM0_DATA_DIR", dir.path().join("data"))
            .env("VM0_HTTP_ADDR", "127.0.0.1:0")
            .env("VM0_SANDBOX", "bubblewrap")
            .env("VM0_SAMPLE_INTERVAL_MS", "200")
            .env_remove("VM0_API_URL")
            .env_remove("VM0_API_KEY")
            .env_remove("VM0_NATS_URL")
            .env_remove("VM0_BOOTSTRAP_API_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("vm0 dev starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let (mut url, mut key) = (None, None);
        let found = tokio::time::timeout(Duration::from_secs(120), async {
            while let Ok(Some(line)) = lines.next_line().await {
                let line = line.trim().to_owned();
                if let Some(u) = line.strip_prefix("URL:") {
                    url = Some(u.trim().to_owned());
                }
                if let Some(k) = line.strip_prefix("API key:") {
                    key = Some(k.trim().to_owned());
                }
                if line.starts_with("metrics:") {
                    return true;
                }
            }
            false
        })
        .await;
        let log = std::fs::read_to_string(dir.path().join("dev.log")).unwrap_or_default();
        assert_eq!(found, Ok(true), "vm0 dev did not start:\n{log}");
        // Its stdout must not fill up.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Stack {
            child: Some(child),
            url: url.expect("vm0 dev printed its URL"),
            key: key.expect("vm0 dev printed an API key"),
            dir,
        }
    }

    pub fn config_home(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    /// `vm0 args…` as the user `vm0 dev` logged in (its config dir).
    pub fn vm0(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_vm0"));
        command
            .args(args)
            .current_dir(self.dir.path())
            .env("XDG_CONFIG_HOME", self.config_home())
            .env_remove("VM0_API_URL")
            .env_remove("VM0_API_KEY")
            .env_remove("NO_COLOR")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }

    pub async fn output(&self, args: &[&str]) -> Output {
        tokio::time::timeout(Duration::from_secs(120), self.vm0(args).output())
            .await
            .unwrap_or_else(|_| panic!("vm0 {args:?} did not end in 120 s"))
            .expect("vm0 ran")
    }

    /// Stdout of a command that must succeed.
    pub async fn ok(&self, args: &[&str]) -> String {
        let out = self.output(args).await;
        assert!(
            out.status.success(),
            "vm0 {args:?}: {:?}\nstdout: {}\nstderr: {}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// Stdout of a `--json` command that must succeed, parsed.
    pub async fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut with_json = vec!["--json"];
        with_json.extend_from_slice(args);
        let stdout = self.ok(&with_json).await;
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("vm0 {args:?} printed no JSON ({e}): {stdout}"))
    }

    pub fn write(&self, name: &str, content: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, content).expect("write");
        path
    }

    /// Stops `vm0 dev` as a user does (Ctrl-C) and waits for it.
    pub async fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            interrupt(&child);
            let ended = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
            assert!(
                matches!(ended, Ok(Ok(status)) if status.success()),
                "vm0 dev did not stop cleanly on SIGINT: {ended:?}"
            );
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // A failed test: stop it anyway, so nats-server goes with it.
        if let Some(child) = &mut self.child {
            interrupt(child);
            for _ in 0..300 {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.start_kill();
        }
    }
}

/// SIGINT to `child`, as Ctrl-C sends.
pub fn interrupt(child: &Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status();
    }
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A TCP relay to `target` whose open connections [`Relay::cut`] closes.
pub struct Relay {
    pub addr: std::net::SocketAddr,
    current: Arc<Mutex<CancellationToken>>,
    pub cuts: Arc<std::sync::atomic::AtomicUsize>,
}

impl Relay {
    pub async fn start(target: &str) -> Relay {
        let target: std::net::SocketAddr = target
            .trim_start_matches("http://")
            .parse()
            .expect("target address");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let current = Arc::new(Mutex::new(CancellationToken::new()));
        let generation = current.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let cut = generation.lock().expect("lock").clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.cancelled() => {}
                    }
                });
            }
        });
        Relay {
            addr,
            current,
            cuts: Arc::default(),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Closes every connection open now; new ones go through.
    pub fn cut(&self) {
        let mut current = self.current.lock().expect("lock");
        current.cancel();
        *current = CancellationToken::new();
        self.cuts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Every regular file and link under `root`: relative path → content or link target.
pub fn tree(root: &Path) -> std::collections::BTreeMap<String, String> {
    let mut found = std::collections::BTreeMap::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).expect("read_dir") {
            let entry = entry.expect("entry");
            let path = entry.path();
            let rel = path
                .strip_prefix(root)
                .expect("under root")
                .to_string_lossy()
                .into_owned();
            let kind = entry.file_type().expect("type");
            if kind.is_symlink() {
                let target = std::fs::read_link(&path).expect("link");
                found.insert(rel, format!("-> {}", target.display()));
            } else if kind.is_dir() {
                pending.push(path);
            } else {
                let bytes = std::fs::read(&path).expect("read");
                found.insert(rel, format!("{} bytes, sha {}", bytes.len(), sha(&bytes)));
            }
        }
    }
    found
}

fn sha(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}
