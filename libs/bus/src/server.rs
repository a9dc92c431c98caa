//! A nats-server child process with JetStream on 127.0.0.1: what `vm0 dev`, the
//! end-to-end tests and the benchmarks run NATS with. Production points
//! `VM0_NATS_URL` at its own servers instead.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("nats-server is not installed (apt-get install nats-server)")]
    NotInstalled,
    #[error("starting nats-server failed")]
    Spawn(#[source] std::io::Error),
    #[error("nats-server did not accept connections on port {port} within 5 s{log}")]
    NotListening { port: u16, log: String },
}

/// `nats-server` on `PATH`, or in the sbin directories Debian installs it to.
pub fn find_nats_server() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|d| d.join("nats-server"))
        .find(|p| p.is_file())
}

/// A running nats-server; killed when dropped.
#[derive(Debug)]
pub struct NatsServer {
    port: u16,
    store_dir: PathBuf,
    log: Option<PathBuf>,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a server on `port`, its JetStream store in `store_dir`, its log in
    /// `log` (discarded when `None`), and waits until it accepts connections.
    pub async fn start(
        port: u16,
        store_dir: &Path,
        log: Option<&Path>,
    ) -> Result<NatsServer, ServerError> {
        let mut server = NatsServer {
            port,
            store_dir: store_dir.to_owned(),
            log: log.map(Path::to_owned),
            child: None,
        };
        server.restart().await?;
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server again (same port, same store) after [`NatsServer::kill`].
    pub async fn restart(&mut self) -> Result<(), ServerError> {
        let program = find_nats_server().ok_or(ServerError::NotInstalled)?;
        let stderr = match &self.log {
            Some(path) => std::fs::File::create(path)
                .map(Stdio::from)
                .map_err(ServerError::Spawn)?,
            None => Stdio::null(),
        };
        let child = Command::new(program)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(&self.store_dir)
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .map_err(ServerError::Spawn)?;
        self.child = Some(child);
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        self.kill().await;
        Err(ServerError::NotListening {
            port: self.port,
            log: self
                .log
                .as_ref()
                .map(|l| format!("; see {}", l.display()))
                .unwrap_or_default(),
        })
    }

    /// Kills the server (SIGKILL, as an outage would) and waits until it is gone.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }
}
