//! The worker's transparent proxy: one per worker, with a listener and a
//! resolver socket in each run's namespace (`netns.rs`). It decides every
//! connection by the run's policy (HTTP by `Host`, TLS by SNI, the rest by
//! address and by the names the run resolved through it), connects out from the
//! worker's own network, moves the bytes and counts them, and reports each
//! attempt as a [`NetworkLog`].

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::intercept::{Intercept, MAX_HEAD, Replayed, rewrite_head, server_name};
use crate::netns::{self, Link, Tools};
use crate::policy::{Policy, Verdict, host_name};
use crate::refused::AlwaysRefused;
use crate::sniff::{self, Sniffed};
use crate::{EgressError, dns};

/// Connection attempts a run keeps in the log queue before they are counted as
/// dropped instead.
const LOG_QUEUE: usize = 1024;
/// Names a run's lookups are remembered under (address → name).
const MAX_NAMES: usize = 4096;
/// Lookups a run has in flight at once; more are answered SERVFAIL.
const MAX_LOOKUPS: usize = 64;
/// Names remembered for one address (a CDN's address serves many).
const NAMES_PER_ADDRESS: usize = 16;

#[derive(Debug, Clone)]
pub struct EgressConfig {
    pub refused: AlwaysRefused,
    /// Connections a run has open at once (`VM0_NETWORK_MAX_CONNECTIONS`).
    pub max_connections: usize,
    pub connect_timeout: Duration,
    /// How long the proxy waits for an HTTP head or a ClientHello.
    pub sniff_timeout: Duration,
    pub lookup_timeout: Duration,
    /// How the proxy verifies the hosts whose TLS it opens (`secretHeaders`).
    pub upstream_tls: Option<Arc<rustls::ClientConfig>>,
    /// What bounds a run's connection tracking (`VM0_NETWORK_NEW_CONNECTIONS_PER_SEC`).
    pub tracking: netns::Tracking,
}

impl EgressConfig {
    pub fn new(refused: AlwaysRefused, max_connections: usize) -> EgressConfig {
        EgressConfig {
            refused,
            max_connections,
            connect_timeout: Duration::from_secs(10),
            sniff_timeout: Duration::from_secs(5),
            lookup_timeout: Duration::from_secs(5),
            tracking: netns::Tracking { per_second: 1000 },
            upstream_tls: None,
        }
    }
}

/// One connection attempt (or refused lookup), as the run's `network` log shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkLog {
    pub host: String,
    pub port: u16,
    /// `http`, `sni`, `tcp`, `mitm` (TLS ended by the proxy to set secret
    /// headers), or `dns` for a refused lookup.
    pub mode: &'static str,
    pub allowed: bool,
    pub rule: String,
    /// Bytes from the network to the run, and from the run to the network.
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_ms: u64,
    pub method: Option<String>,
    pub url: Option<String>,
    pub status: Option<u16>,
    /// Why an allowed connection did not go through.
    pub error: Option<String>,
}

impl NetworkLog {
    /// As VM0 writes it: `GET http://host/path - 200 (12ms)`,
    /// `CONNECT host:443 - allowed (sni)`, `... - denied (rule)`.
    pub fn message(&self) -> String {
        let what = match (&self.method, &self.url) {
            (Some(m), Some(u)) => format!("{m} {u}"),
            _ if self.mode == "dns" => format!("DNS {}", self.host),
            _ => format!("CONNECT {}:{}", self.host, self.port),
        };
        let outcome = if !self.allowed {
            format!("denied ({})", self.rule)
        } else if let Some(e) = &self.error {
            format!("failed ({e})")
        } else if let Some(status) = self.status {
            status.to_string()
        } else {
            format!("allowed ({})", self.mode)
        };
        format!("{what} - {outcome} ({}ms)", self.duration_ms)
    }

    /// Logged at `error`: a refused attempt, a failed one, an HTTP status of 400 or more.
    pub fn is_error(&self) -> bool {
        !self.allowed || self.error.is_some() || self.status.is_some_and(|s| s >= 400)
    }

    pub fn metadata(&self) -> serde_json::Value {
        let mut m = serde_json::json!({
            "host": self.host,
            "port": self.port,
            "mode": self.mode,
            "action": if self.allowed { "allow" } else { "deny" },
            "rule": self.rule,
            "bytesIn": self.bytes_in,
            "bytesOut": self.bytes_out,
            "durationMs": self.duration_ms,
        });
        if let Some(obj) = m.as_object_mut() {
            if let Some(v) = &self.method {
                obj.insert("method".into(), v.clone().into());
            }
            if let Some(v) = &self.url {
                obj.insert("url".into(), v.clone().into());
            }
            if let Some(v) = self.status {
                obj.insert("status".into(), v.into());
            }
            if let Some(v) = &self.error {
                obj.insert("error".into(), v.clone().into());
            }
        }
        m
    }
}

/// The proxy of one worker.
#[derive(Debug, Clone)]
pub struct Egress {
    config: Arc<EgressConfig>,
    tools: Tools,
    /// How this worker's sandboxes attach (what [`Egress::new`] tried).
    link: Link,
}

/// Every address of this host's interfaces (the worker's own addresses).
pub fn host_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|a| a.address)
        .filter_map(|a| {
            if let Some(v4) = a.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect()
}

fn find_on_path(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

impl Egress {
    /// The proxy, if this host can give runs their namespaces attached as
    /// `link` (`ip` and `nft`; an unprivileged worker also a user namespace,
    /// and a tap in it, tried once here); otherwise why not.
    pub fn new(config: EgressConfig, link: Link) -> Result<Egress, EgressError> {
        let ip = find_on_path("ip").ok_or_else(|| {
            EgressError::Unavailable("`ip` is not installed (apt-get install iproute2)".into())
        })?;
        let nft = find_on_path("nft").ok_or_else(|| {
            EgressError::Unavailable("`nft` is not installed (apt-get install nftables)".into())
        })?;
        let tools = Tools { ip, nft };
        if !nix::unistd::geteuid().is_root() {
            netns::create(&tools, link, config.tracking).map_err(|e| {
                EgressError::Unavailable(format!(
                    "the worker is not root and cannot make a user namespace for a run's network ({e})"
                ))
            })?;
        }
        Ok(Egress {
            config: Arc::new(config),
            tools,
            link,
        })
    }

    /// The link this proxy was made for: how the worker's sandboxes attach.
    pub fn link(&self) -> Link {
        self.link
    }

    /// The TLS termination of a run whose `hosts` have secret headers (host →
    /// header → value), verifying hosts as this proxy's configuration says.
    pub fn intercept(
        &self,
        run_id: &str,
        hosts: std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>,
    ) -> Result<Intercept, EgressError> {
        let upstream = match &self.config.upstream_tls {
            Some(config) => config.clone(),
            None => crate::intercept::upstream_tls(None)?,
        };
        Intercept::new(run_id, hosts, upstream)
    }

    /// A run's namespace, attached as `link` says, with the proxy listening in
    /// it under `policy`, ending TLS to set headers as `intercept` says.
    pub async fn open(
        &self,
        policy: Policy,
        link: Link,
        intercept: Option<Intercept>,
    ) -> Result<RunEgress, EgressError> {
        let tools = self.tools.clone();
        let tracking = self.config.tracking;
        let ns = tokio::task::spawn_blocking(move || netns::create(&tools, link, tracking))
            .await
            .map_err(|e| EgressError::Setup(format!("the namespace's task: {e}")))??;
        let setup = |e: std::io::Error| EgressError::Setup(format!("the proxy's sockets: {e}"));
        ns.tcp.set_nonblocking(true).map_err(setup)?;
        ns.udp.set_nonblocking(true).map_err(setup)?;
        let tcp = TcpListener::from_std(ns.tcp).map_err(setup)?;
        let udp = UdpSocket::from_std(ns.udp).map_err(setup)?;
        let (logs, log_rx) = mpsc::channel(LOG_QUEUE);
        let run = Arc::new(RunState {
            policy,
            intercept,
            config: self.config.clone(),
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            attempts: AtomicU64::new(0),
            names: Mutex::new(HashMap::new()),
            logs,
            dropped: AtomicU64::new(0),
            connections: Arc::new(Semaphore::new(self.config.max_connections)),
            lookups: Arc::new(Semaphore::new(MAX_LOOKUPS)),
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
        });
        run.tracker.spawn(accept_loop(tcp, run.clone()));
        run.tracker.spawn(dns_loop(Arc::new(udp), run.clone()));
        Ok(RunEgress {
            tools: self.tools.clone(),
            netns: Arc::new(ns.fd),
            userns: ns.user.map(Arc::new),
            tap: ns.tap.map(Arc::new),
            run,
            logs: log_rx,
        })
    }
}

struct RunState {
    policy: Policy,
    intercept: Option<Intercept>,
    config: Arc<EgressConfig>,
    received: AtomicU64,
    sent: AtomicU64,
    /// Connections accepted and DNS queries received.
    attempts: AtomicU64,
    /// What the run's own lookups answered: a connection by address is known
    /// by the name the run asked for.
    names: Mutex<HashMap<Ipv4Addr, Vec<String>>>,
    logs: mpsc::Sender<NetworkLog>,
    dropped: AtomicU64,
    connections: Arc<Semaphore>,
    lookups: Arc<Semaphore>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl RunState {
    fn log(&self, entry: NetworkLog) {
        if self.logs.try_send(entry).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The names the run's lookups answered with `ip`.
    fn names_of(&self, ip: Ipv4Addr) -> Vec<String> {
        self.names
            .lock()
            .ok()
            .and_then(|n| n.get(&ip).cloned())
            .unwrap_or_default()
    }

    fn remember(&self, name: &str, addrs: &[Ipv4Addr]) {
        if let Ok(mut names) = self.names.lock() {
            if names.len() + addrs.len() > MAX_NAMES {
                names.clear();
            }
            for a in addrs {
                let known = names.entry(*a).or_default();
                if !known.iter().any(|n| n == name) && known.len() < NAMES_PER_ADDRESS {
                    known.push(name.to_owned());
                }
            }
        }
    }

    /// The verdict on a connection by address: a deny by any name the run
    /// resolved to it wins, then an allow by one, then the address alone.
    fn decide_by_address(&self, ip: Ipv4Addr, port: u16) -> Verdict {
        let by_address = self.policy.decide(None, Some(IpAddr::V4(ip)), Some(port));
        let by_names: Vec<Verdict> = self
            .names_of(ip)
            .iter()
            .map(|n| {
                self.policy
                    .decide(Some(n), Some(IpAddr::V4(ip)), Some(port))
            })
            .collect();
        if let Some(deny) = by_names.iter().find(|v| v.rule().starts_with("deny ")) {
            return deny.clone();
        }
        if by_address.allowed() {
            return by_address;
        }
        by_names
            .into_iter()
            .find(Verdict::allowed)
            .unwrap_or(by_address)
    }
}

/// What a closed run's proxy had not logged yet, and what it never logs one
/// by one.
#[derive(Debug)]
pub struct Closed {
    pub rest: Vec<NetworkLog>,
    /// Entries dropped past the log queue.
    pub dropped: u64,
    /// Connection attempts and DNS queries refused by the rate of new ones
    /// (`VM0_NETWORK_NEW_CONNECTIONS_PER_SEC`), or why that is unknown.
    pub over_rate: Result<u64, String>,
}

/// A run's share of the proxy. Dropping it (or [`RunEgress::close`]) stops its
/// listener and its connections; the namespace goes with its last process.
pub struct RunEgress {
    tools: Tools,
    netns: Arc<OwnedFd>,
    userns: Option<Arc<OwnedFd>>,
    tap: Option<Arc<OwnedFd>>,
    run: Arc<RunState>,
    logs: mpsc::Receiver<NetworkLog>,
}

impl RunEgress {
    /// The run's CA (PEM), when the proxy ends TLS for it: what the sandbox
    /// must trust.
    pub fn ca_pem(&self) -> Option<String> {
        self.run.intercept.as_ref().map(Intercept::ca_pem)
    }

    /// The namespace the sandbox joins.
    pub fn netns(&self) -> Arc<OwnedFd> {
        self.netns.clone()
    }

    /// The user namespace that owns [`RunEgress::netns`] (an unprivileged
    /// worker's), to join before it.
    pub fn userns(&self) -> Option<Arc<OwnedFd>> {
        self.userns.clone()
    }

    /// The tap device a VM's network card is backed by (a [`Link::Tap`] run).
    pub fn tap(&self) -> Option<Arc<OwnedFd>> {
        self.tap.clone()
    }

    /// Bytes received by the run from the network, and sent by it, so far.
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.run.received.load(Ordering::Relaxed),
            self.run.sent.load(Ordering::Relaxed),
        )
    }

    /// The next connection attempt to log (waits for one).
    pub async fn next_log(&mut self) -> Option<NetworkLog> {
        self.logs.recv().await
    }

    /// Stops everything of the run, and returns what is left to log and what
    /// was not logged one by one.
    pub async fn close(mut self) -> Closed {
        self.run.cancel.cancel();
        self.run.tracker.close();
        // Each connection logs itself as it is cut.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.run.tracker.wait()).await;
        let mut rest = Vec::new();
        while let Ok(entry) = self.logs.try_recv() {
            rest.push(entry);
        }
        // The rate's bucket starts full with a burst of twice the rate, which
        // only what passes empties: a run that made fewer attempts than that
        // cannot have been refused, and its rules need no reading.
        let per_second = u64::from(self.run.config.tracking.per_second);
        let over_rate = if per_second > 0
            && self.run.attempts.load(Ordering::Relaxed) >= per_second.saturating_mul(2)
        {
            let (tools, user, net) = (self.tools.clone(), self.userns.clone(), self.netns.clone());
            tokio::task::spawn_blocking(move || {
                netns::refused_over_rate(&tools, user.as_deref(), &net)
            })
            .await
            .map_err(|e| EgressError::Setup(e.to_string()))
            .and_then(|r| r)
            .map_err(|e| e.to_string())
        } else {
            Ok(0)
        };
        Closed {
            rest,
            dropped: self.run.dropped.load(Ordering::Relaxed),
            over_rate,
        }
    }
}

impl Drop for RunEgress {
    fn drop(&mut self) {
        self.run.cancel.cancel();
    }
}

async fn accept_loop(listener: TcpListener, run: Arc<RunState>) {
    loop {
        let accepted = tokio::select! {
            _ = run.cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => {
                run.attempts.fetch_add(1, Ordering::Relaxed);
                let run2 = run.clone();
                run.tracker.spawn(async move {
                    let cancel = run2.cancel.clone();
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        _ = connection(stream, run2) => {}
                    }
                });
            }
            Err(e) => {
                tracing::debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Where the sandbox meant to connect (before the redirect).
fn original_destination(stream: &TcpStream) -> Option<SocketAddrV4> {
    let addr = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::OriginalDst).ok()?;
    let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
    Some(SocketAddrV4::new(ip, u16::from_be(addr.sin_port)))
}

/// Reads until `sniff` decides, the sniff window passes or the client stops.
async fn sniff_head(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    timeout: Duration,
    sniff: fn(&[u8]) -> Sniffed,
) -> Sniffed {
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return Sniffed::Opaque,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            match sniff(buf) {
                Sniffed::Partial => continue,
                s => return s,
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or(Sniffed::Opaque)
}

async fn resolve(run: &RunState, name: &str) -> Result<Vec<IpAddr>, String> {
    if let Some(ip) = run.policy.extra_host(name) {
        return Ok(vec![IpAddr::V4(ip)]);
    }
    let found = tokio::time::timeout(
        run.config.lookup_timeout,
        tokio::net::lookup_host((name, 0u16)),
    )
    .await
    .map_err(|_| "lookup timed out".to_owned())?
    .map_err(|e| format!("no such host ({e})"))?;
    let mut addrs: Vec<IpAddr> = found.map(|sa| sa.ip()).collect();
    // IPv4 first: the run's own answers are IPv4.
    addrs.sort_by_key(|a| !a.is_ipv4());
    addrs.dedup();
    if addrs.is_empty() {
        return Err("no such host".into());
    }
    Ok(addrs)
}

async fn connection(mut client: TcpStream, run: Arc<RunState>) {
    let started = Instant::now();
    let Some(orig) = original_destination(&client) else {
        return;
    };
    let port = orig.port();
    let mut entry = NetworkLog {
        host: orig.ip().to_string(),
        port,
        mode: "tcp",
        allowed: false,
        rule: String::new(),
        bytes_in: 0,
        bytes_out: 0,
        duration_ms: 0,
        method: None,
        url: None,
        status: None,
        error: None,
    };
    let finish = |mut entry: NetworkLog| {
        entry.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        run.log(entry);
    };
    // A connection to the proxy's own port, not redirected.
    if orig.ip().is_loopback() {
        return;
    }
    let Ok(_permit) = run.connections.clone().try_acquire_owned() else {
        entry.rule = format!(
            "connection limit ({} open, VM0_NETWORK_MAX_CONNECTIONS)",
            run.config.max_connections
        );
        finish(entry);
        return;
    };
    let mut head = Vec::new();
    let sniffed = match port {
        80 => {
            sniff_head(
                &mut client,
                &mut head,
                run.config.sniff_timeout,
                sniff::http,
            )
            .await
        }
        443 => sniff_head(&mut client, &mut head, run.config.sniff_timeout, sniff::tls).await,
        _ => Sniffed::Opaque,
    };
    let name = match sniffed {
        Sniffed::Http { method, host, path } => {
            entry.mode = "http";
            entry.url = Some(format!("http://{host}{path}"));
            entry.method = Some(method);
            entry.host = host;
            host_name(&entry.host)
        }
        Sniffed::Tls { sni } => {
            entry.mode = "sni";
            entry.host = sni;
            host_name(&entry.host)
        }
        Sniffed::Partial | Sniffed::Opaque => None,
    };
    // Where to connect: by the name the connection shows (resolved here, never
    // trusting the address the sandbox picked), else the address.
    let target = match (&name, entry.mode) {
        (Some(n), "http" | "sni") if !run.names_of(*orig.ip()).contains(n) => {
            if run.policy.mode == crate::policy::Mode::None {
                IpAddr::V4(*orig.ip())
            } else {
                match resolve(&run, n).await {
                    Ok(addrs) => addrs[0],
                    Err(why) => {
                        let v = run.policy.decide(name.as_deref(), None, Some(port));
                        entry.allowed = v.allowed();
                        entry.rule = v.rule().to_owned();
                        if entry.allowed {
                            entry.error = Some(why);
                        }
                        finish(entry);
                        return;
                    }
                }
            }
        }
        // An IP literal in Host: the address it names.
        (None, "http") => entry
            .host
            .parse::<IpAddr>()
            .unwrap_or(IpAddr::V4(*orig.ip())),
        _ => IpAddr::V4(*orig.ip()),
    };
    let to = SocketAddr::new(target, port);
    let mut verdict = match (&name, target) {
        // No name shown: known by the names the run's lookups gave it.
        (None, IpAddr::V4(v4)) if entry.mode == "tcp" => run.decide_by_address(v4, port),
        _ => run.policy.decide(name.as_deref(), Some(target), Some(port)),
    };
    if verdict.allowed()
        && let Some(why) = run.config.refused.check(to)
    {
        verdict = Verdict::Deny { rule: why };
    }
    entry.allowed = verdict.allowed();
    entry.rule = verdict.rule().to_owned();
    if !entry.allowed {
        if entry.mode == "http" {
            let body = format!(
                "vm0: {} denied by the run's network policy ({})\n",
                entry.url.as_deref().unwrap_or_default(),
                entry.rule
            );
            let resp = format!(
                "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = client.write_all(resp.as_bytes()).await;
            let _ = client.shutdown().await;
        }
        finish(entry);
        return;
    }
    let connected = tokio::time::timeout(run.config.connect_timeout, TcpStream::connect(to))
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("connect timed out")));
    let mut upstream = match connected {
        Ok(s) => s,
        Err(e) => {
            entry.error = Some(e.to_string());
            finish(entry);
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let _ = client.set_nodelay(true);
    if entry.mode == "sni"
        && let (Some(intercept), Some(host)) = (&run.intercept, &name)
        && let Some(headers) = intercept.headers_for(host)
    {
        entry.mode = "mitm";
        if let Err(why) = intercepted(
            client, head, upstream, intercept, host, headers, &run, &mut entry,
        )
        .await
        {
            entry.error = Some(why);
        }
        finish(entry);
        return;
    }
    if upstream.write_all(&head).await.is_err() {
        entry.error = Some("the destination closed the connection".into());
        finish(entry);
        return;
    }
    run.sent.fetch_add(head.len() as u64, Ordering::Relaxed);
    let want_status = entry.mode == "http";
    let mut first = Vec::new();
    let (mut cr, mut cw) = client.split();
    let (mut ur, mut uw) = upstream.split();
    let (out, inn) = tokio::join!(
        pump(&mut cr, &mut uw, &run.sent, None),
        pump(
            &mut ur,
            &mut cw,
            &run.received,
            want_status.then_some(&mut first)
        ),
    );
    entry.bytes_out = head.len() as u64 + out;
    entry.bytes_in = inn;
    entry.status = sniff::http_status(&first);
    finish(entry);
}

/// A connection whose TLS the proxy ends: the run's TLS with a certificate of
/// its CA (`hello` is the ClientHello already read), the proxy's own TLS to the
/// host, then the request head rewritten with `headers` and the rest copied.
#[allow(clippy::too_many_arguments)]
async fn intercepted(
    client: TcpStream,
    hello: Vec<u8>,
    upstream: TcpStream,
    intercept: &Intercept,
    host: &str,
    headers: &[(String, String)],
    run: &RunState,
    entry: &mut NetworkLog,
) -> Result<(), String> {
    let timed = |what: &'static str| move |_| format!("{what} timed out");
    let acceptor = intercept.acceptor(host)?;
    let mut client = tokio::time::timeout(
        run.config.sniff_timeout,
        acceptor.accept(Replayed::new(hello, client)),
    )
    .await
    .map_err(timed("TLS with the run"))?
    .map_err(|e| format!("TLS with the run: {e}"))?;
    // The run's request follows its Finished at once; a client with Nagle's
    // algorithm on holds it until that is acknowledged, which a delayed ACK
    // makes tens of milliseconds. Acknowledge now.
    let _ = socket2::SockRef::from(client.get_ref().0.tcp()).set_tcp_quickack(true);
    let mut upstream = tokio::time::timeout(
        run.config.connect_timeout,
        intercept.upstream().connect(server_name(host)?, upstream),
    )
    .await
    .map_err(timed("TLS with the host"))?
    .map_err(|e| format!("TLS with the host: {e}"))?;
    let mut head = Vec::new();
    let end = tokio::time::timeout(run.config.sniff_timeout, async {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(at) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                return Ok(at + 4);
            }
            if head.len() > MAX_HEAD {
                return Err(format!("a request head over {MAX_HEAD} bytes"));
            }
            match client.read(&mut chunk).await {
                Ok(0) | Err(_) => return Err("the run closed before a request".to_owned()),
                Ok(n) => head.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .map_err(timed("the request head"))??;
    let (rewritten, method, path) = rewrite_head(&head[..end], headers)
        .ok_or_else(|| "not an HTTP/1 request (secretHeaders speak HTTP/1.1)".to_owned())?;
    entry.method = Some(method);
    entry.url = Some(format!("https://{host}{path}"));
    let body_start = &head[end..];
    upstream
        .write_all(&rewritten)
        .await
        .and(upstream.write_all(body_start).await)
        .map_err(|e| format!("writing to the host: {e}"))?;
    let first_out = (rewritten.len() + body_start.len()) as u64;
    run.sent.fetch_add(first_out, Ordering::Relaxed);
    let mut first = Vec::new();
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let (out, inn) = tokio::join!(
        pump(&mut cr, &mut uw, &run.sent, None),
        pump(&mut ur, &mut cw, &run.received, Some(&mut first)),
    );
    entry.bytes_out = first_out + out;
    entry.bytes_in = inn;
    entry.status = sniff::http_status(&first);
    Ok(())
}

/// Copies `from` to `to` until either ends, counting into `counter` as it goes;
/// `first` keeps the first bytes (an HTTP response's status line).
async fn pump<R, W>(
    from: &mut R,
    to: &mut W,
    counter: &AtomicU64,
    mut first: Option<&mut Vec<u8>>,
) -> u64
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 32 * 1024];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(first) = first.as_deref_mut()
            && first.len() < 64
        {
            let take = n.min(64 - first.len());
            first.extend_from_slice(&buf[..take]);
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        total += n as u64;
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
    let _ = to.shutdown().await;
    total
}

async fn dns_loop(socket: Arc<UdpSocket>, run: Arc<RunState>) {
    let mut buf = vec![0u8; 1500];
    loop {
        let received = tokio::select! {
            _ = run.cancel.cancelled() => return,
            r = socket.recv_from(&mut buf) => r,
        };
        let Ok((n, from)) = received else { continue };
        run.attempts.fetch_add(1, Ordering::Relaxed);
        let Ok(query) = dns::parse_query(&buf[..n]) else {
            continue;
        };
        run.sent.fetch_add(n as u64, Ordering::Relaxed);
        let Ok(permit) = run.lookups.clone().try_acquire_owned() else {
            let _ = socket
                .send_to(&dns::answer(&query, dns::SERVFAIL, &[]), from)
                .await;
            continue;
        };
        let (socket, run2) = (socket.clone(), run.clone());
        run.tracker.spawn(async move {
            let _permit = permit;
            let reply = lookup(&run2, &query).await;
            run2.received
                .fetch_add(reply.len() as u64, Ordering::Relaxed);
            let _ = socket.send_to(&reply, from).await;
        });
    }
}

async fn lookup(run: &RunState, query: &dns::Query) -> Vec<u8> {
    let started = Instant::now();
    let Some(name) = host_name(&query.name) else {
        return dns::answer(query, dns::NXDOMAIN, &[]);
    };
    let verdict = run.policy.lookup(&name);
    if !verdict.allowed() {
        run.log(NetworkLog {
            host: name,
            port: 53,
            mode: "dns",
            allowed: false,
            rule: verdict.rule().to_owned(),
            bytes_in: 0,
            bytes_out: 0,
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            method: None,
            url: None,
            status: None,
            error: None,
        });
        return dns::answer(query, dns::REFUSED, &[]);
    }
    match resolve(run, &name).await {
        Ok(addrs) => {
            let v4: Vec<Ipv4Addr> = addrs
                .into_iter()
                .filter_map(|a| match crate::policy::canonical(a) {
                    IpAddr::V4(v4) => Some(v4),
                    IpAddr::V6(_) => None,
                })
                .collect();
            run.remember(&name, &v4);
            dns::answer(query, dns::NOERROR, &v4)
        }
        Err(_) => dns::answer(query, dns::NXDOMAIN, &[]),
    }
}
