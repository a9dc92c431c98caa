//! A nats-server child process with JetStream on 127.0.0.1: what `vm0 dev`, the
//! end-to-end tests and the benchmarks run NATS with. It has the two roles'
//! users with fresh passwords (no anonymous access) and, when asked, TLS.
//! Production points `VM0_NATS_URL` at its own servers instead
//! (`vm0-gateway nats-config` writes their `authorization` block).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::NatsOptions;
use crate::auth::{Credentials, PasswordForm, Role, authorization_block};

/// A server certificate for TLS, and the CA clients trust it by.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub ca_file: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("nats-server is not installed (apt-get install nats-server)")]
    NotInstalled,
    #[error("starting nats-server failed")]
    Spawn(#[source] std::io::Error),
    #[error("nats-server did not accept connections on port {port} within 5 s{log}")]
    NotListening { port: u16, log: String },
    #[error("writing the nats-server configuration")]
    Config(#[source] std::io::Error),
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
    gateway: Credentials,
    worker: Credentials,
    tls: Option<ServerTls>,
}

impl NatsServer {
    /// Starts a server on `port`, its JetStream store in `store_dir`, its log in
    /// `log` (discarded when `None`), and waits until it accepts connections.
    pub async fn start(
        port: u16,
        store_dir: &Path,
        log: Option<&Path>,
    ) -> Result<NatsServer, ServerError> {
        NatsServer::start_with(port, store_dir, log, None).await
    }

    /// [`NatsServer::start`], with TLS when `tls` is given (then every client
    /// must speak TLS).
    pub async fn start_with(
        port: u16,
        store_dir: &Path,
        log: Option<&Path>,
        tls: Option<ServerTls>,
    ) -> Result<NatsServer, ServerError> {
        let mut server = NatsServer {
            port,
            store_dir: store_dir.to_owned(),
            log: log.map(Path::to_owned),
            child: None,
            gateway: Credentials::generate(Role::Gateway),
            worker: Credentials::generate(Role::Worker),
            tls,
        };
        server.restart().await?;
        Ok(server)
    }

    /// The address, without credentials.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "tls" } else { "nats" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// A role's user and password on this server.
    pub fn credentials(&self, role: Role) -> &Credentials {
        match role {
            Role::Gateway => &self.gateway,
            Role::Worker => &self.worker,
        }
    }

    /// How `role` connects: the address, its credentials and the CA.
    pub fn options(&self, role: Role) -> NatsOptions {
        let options = NatsOptions::new(self.url()).with_credentials(self.credentials(role).clone());
        match &self.tls {
            Some(tls) => options.with_ca(tls.ca_file.clone()),
            None => options,
        }
    }

    /// The configuration file: users and, if asked, TLS (private: it holds the
    /// passwords).
    fn write_config(&self) -> Result<PathBuf, ServerError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let users = [(Role::Gateway, &self.gateway), (Role::Worker, &self.worker)];
        let mut config = authorization_block(&users, PasswordForm::Plain)
            .map_err(|e| ServerError::Config(std::io::Error::other(e)))?;
        if let Some(tls) = &self.tls {
            let path = |p: &Path| serde_json::Value::String(p.display().to_string()).to_string();
            config.push_str(&format!(
                "tls {{\n  cert_file: {}\n  key_file: {}\n}}\n",
                path(&tls.cert_file),
                path(&tls.key_file)
            ));
        }
        std::fs::create_dir_all(&self.store_dir).map_err(ServerError::Config)?;
        let file = self.store_dir.join("server.conf");
        let _ = std::fs::remove_file(&file);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&file)
            .and_then(|mut f| f.write_all(config.as_bytes()))
            .map_err(ServerError::Config)?;
        Ok(file)
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
        let config = self.write_config()?;
        let child = Command::new(program)
            .arg("-c")
            .arg(&config)
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
