//! `vm0-egress-bench`: the worker's egress proxy against a direct connection, on
//! this machine. A "remote" host is a network namespace behind a veth pair; a
//! client in a run's namespace reaches it through the proxy, the same client in
//! the worker's namespace directly. Measures stream throughput (one and ten
//! streams), connections per second, and the time a run's network takes to set
//! up. Needs root (namespaces), `ip` and `nft`; `--setup-only` measures the
//! set-up alone, which an unprivileged user can (a user namespace of its own).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use vm0_egress::policy::{Cidr, Policy};
use vm0_egress::refused::AlwaysRefused;
use vm0_egress::{Egress, EgressConfig, Link};

mod egress_tls;

#[derive(Parser)]
struct Args {
    /// MiB each stream moves.
    #[arg(long, default_value_t = 1024)]
    mib: u64,
    /// Connections per connection-rate sample.
    #[arg(long, default_value_t = 2000)]
    connections: usize,
    /// Namespaces made (and closed) for the set-up time.
    #[arg(long, default_value_t = 100)]
    setups: usize,
    /// What to measure: `tcp` (streams, connections), `tls` (HTTPS through
    /// SNI and through secretHeaders' TLS), `setup` (alone needs no root).
    #[arg(long, value_delimiter = ',', default_value = "tcp,tls,setup")]
    only: Vec<String>,
    /// HTTPS requests per client for the request rate.
    #[arg(long, default_value_t = 500)]
    tls_requests: usize,
    /// MiB of the one HTTPS download.
    #[arg(long, default_value_t = 256)]
    tls_mib: u64,
}

const STREAM_PORT: u16 = 5001;
const CONNECT_PORT: u16 = 5002;

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The remote host: a namespace at 10.250.<n>.2 behind a veth.
struct Remote {
    ns: String,
    addr: String,
}

impl Remote {
    fn start() -> Result<Remote> {
        let n = std::process::id() % 250;
        let ns = format!("vm0b-{}", std::process::id());
        let host_if = format!("vm0b{n}");
        ip(&["netns", "add", &ns])?;
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        ip(&["addr", "add", &format!("10.250.{n}.1/30"), "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("10.250.{n}.2/30"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        Ok(Remote {
            ns,
            addr: format!("10.250.{n}.2"),
        })
    }

    /// Listeners in the remote's namespace: a source of as many MiB of zeros as
    /// asked on one port, a greeting that closes at once on the other.
    fn serve(&self) -> Result<()> {
        let ns: OwnedFd = std::fs::File::open(format!("/run/netns/{}", self.ns))?.into();
        let addr = self.addr.clone();
        let (stream, connect) =
            std::thread::spawn(move || -> Result<(TcpListener, TcpListener)> {
                nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
                Ok((
                    TcpListener::bind((addr.as_str(), STREAM_PORT))?,
                    TcpListener::bind((addr.as_str(), CONNECT_PORT))?,
                ))
            })
            .join()
            .map_err(|_| anyhow::anyhow!("listener thread"))??;
        std::thread::spawn(move || {
            for conn in stream.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut conn = conn;
                    // The client says how many MiB it wants.
                    let mut want = [0u8; 8];
                    if conn.read_exact(&mut want).is_err() {
                        return;
                    }
                    let chunk = vec![0u8; 256 * 1024];
                    for _ in 0..u64::from_le_bytes(want) * 4 {
                        if conn.write_all(&chunk).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        std::thread::spawn(move || {
            for conn in connect.incoming().flatten() {
                let mut conn = conn;
                let _ = conn.write_all(b"ok\n");
            }
        });
        Ok(())
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.ns])
            .status();
    }
}

/// Runs `f` on `threads` threads, each in `netns` when given.
fn on_threads<T: Send + 'static>(
    netns: Option<&OwnedFd>,
    threads: usize,
    f: impl Fn() -> Result<T> + Send + Sync + 'static,
) -> Result<Vec<T>> {
    let f = Arc::new(f);
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let ns = netns.map(|n| n.try_clone()).transpose()?;
            let f = f.clone();
            Ok(std::thread::spawn(move || -> Result<T> {
                if let Some(ns) = ns {
                    nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
                }
                f()
            }))
        })
        .collect::<Result<_>>()?;
    handles
        .into_iter()
        .map(|h| h.join().map_err(|_| anyhow::anyhow!("thread panicked"))?)
        .collect()
}

fn throughput(netns: Option<&OwnedFd>, to: SocketAddr, streams: usize, mib: u64) -> Result<f64> {
    let started = Instant::now();
    let bytes: u64 = on_threads(netns, streams, move || {
        let mut conn = TcpStream::connect(to)?;
        conn.write_all(&mib.to_le_bytes())?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            match conn.read(&mut buf)? {
                0 => break,
                n => total += n as u64,
            }
        }
        Ok(total)
    })?
    .into_iter()
    .sum();
    let want = (streams as u64 * mib) << 20;
    if bytes != want {
        bail!("moved {bytes} bytes, wanted {want}");
    }
    Ok(bytes as f64 / 1e6 / started.elapsed().as_secs_f64())
}

fn connection_rate(
    netns: Option<&OwnedFd>,
    to: SocketAddr,
    threads: usize,
    total: usize,
) -> Result<f64> {
    let each = total / threads;
    let started = Instant::now();
    on_threads(netns, threads, move || {
        for _ in 0..each {
            let mut conn = TcpStream::connect(to)?;
            let mut buf = [0u8; 3];
            conn.read_exact(&mut buf)?;
        }
        Ok(())
    })?;
    Ok((each * threads) as f64 / started.elapsed().as_secs_f64())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let wants = |what: &str| args.only.iter().any(|o| o == what);
    if !wants("tcp") && !wants("tls") {
        let egress = Egress::new(
            EgressConfig::new(
                AlwaysRefused {
                    trusted: Vec::new(),
                    own: vm0_egress::proxy::host_addresses(),
                    endpoints: Vec::new(),
                },
                1024,
            ),
            Link::Loopback,
        )?;
        return setup_times(&egress, args.setups).await;
    }
    let remote = Remote::start()?;
    remote.serve()?;
    let trusted = Cidr::parse("10.250.0.0/16").context("cidr")?;
    let refused = AlwaysRefused {
        trusted: vec![trusted],
        own: vm0_egress::proxy::host_addresses(),
        endpoints: Vec::new(),
    };
    let ca = vm0_tls::Authority::new("vm0 bench remote")?;
    let mut config = EgressConfig::new(refused, 1024);
    config.upstream_tls = Some(vm0_egress::intercept::upstream_tls(Some(&ca.cert_pem()))?);
    // The proxy's own speed: no per-run rate of new connections.
    config.tracking.per_second = 0;
    let egress = Egress::new(config, Link::Loopback)?;
    if wants("tcp") {
        tcp(&egress, &remote, &args).await?;
    }
    if wants("tls") {
        tls(&egress, &remote, &ca, &args).await?;
    }
    if wants("setup") {
        setup_times(&egress, args.setups).await?;
    }
    Ok(())
}

/// Streams and connections: direct against through the proxy.
async fn tcp(egress: &Egress, remote: &Remote, args: &Args) -> Result<()> {
    let run = egress.open(Policy::default(), Link::Loopback, None).await?;
    let stream: SocketAddr = format!("{}:{STREAM_PORT}", remote.addr).parse()?;
    let connect: SocketAddr = format!("{}:{CONNECT_PORT}", remote.addr).parse()?;
    let netns = run.netns();
    let mib = args.mib;
    let total = args.connections;
    let results = tokio::task::spawn_blocking(move || -> Result<Vec<(String, f64, f64)>> {
        let mut rows = Vec::new();
        for streams in [1usize, 10] {
            let per = if streams == 1 { mib } else { mib / 10 };
            let direct = throughput(None, stream, streams, per)?;
            let proxied = throughput(Some(&netns), stream, streams, per)?;
            rows.push((
                format!("throughput, {streams} stream(s), MB/s"),
                direct,
                proxied,
            ));
        }
        for threads in [1usize, 10] {
            let direct = connection_rate(None, connect, threads, total)?;
            let proxied = connection_rate(Some(&netns), connect, threads, total)?;
            rows.push((
                format!("connections/s, {threads} client(s)"),
                direct,
                proxied,
            ));
        }
        Ok(rows)
    })
    .await??;
    let closed = run.close().await;
    let (logs, dropped) = (closed.rest, closed.dropped);
    println!("| | direct | through the proxy | ratio |");
    println!("| --- | --- | --- | --- |");
    for (what, direct, proxied) in &results {
        println!(
            "| {what} | {direct:.0} | {proxied:.0} | {:.2} |",
            proxied / direct
        );
    }
    println!(
        "(the proxy logged {} connections, {dropped} dropped past its queue)",
        logs.len()
    );
    Ok(())
}

/// HTTPS, one request per connection: direct, through the proxy by SNI, and
/// with a secret header (the proxy ends the run's TLS and opens its own).
async fn tls(egress: &Egress, remote: &Remote, ca: &vm0_tls::Authority, args: &Args) -> Result<()> {
    let ns: OwnedFd = std::fs::File::open(format!("/run/netns/{}", remote.ns))?.into();
    egress_tls::serve(ns, remote.addr.clone(), ca)?;
    let policy = Policy::parse("open", [], [], [(egress_tls::NAME, remote.addr.as_str())])?;
    let sni = egress.open(policy.clone(), Link::Loopback, None).await?;
    let headers = std::collections::BTreeMap::from([(
        "x-api-key".to_owned(),
        "bench-secret-value".to_owned(),
    )]);
    let hosts = std::collections::BTreeMap::from([(egress_tls::NAME.to_owned(), headers)]);
    let mitm = egress
        .open(
            policy,
            Link::Loopback,
            Some(egress.intercept("run_bench", hosts)?),
        )
        .await?;
    let run_ca = mitm.ca_pem().context("the run's CA")?;
    let to: SocketAddr = format!("{}:443", remote.addr).parse()?;
    let remote_roots = egress_tls::client(&ca.cert_pem())?;
    let run_roots = egress_tls::client(&run_ca)?;
    let (sni_ns, mitm_ns) = (sni.netns(), mitm.netns());
    let (each, bytes) = (args.tls_requests, args.tls_mib << 20);
    let rows = tokio::task::spawn_blocking(move || -> Result<Vec<(String, [f64; 3])>> {
        let mut rows = Vec::new();
        for threads in [1usize, 10] {
            let per = each / threads;
            let measure = |ns: Option<&OwnedFd>, roots: &Arc<rustls::ClientConfig>| {
                egress_tls::rate(ns, roots.clone(), to, threads, per, 2).map(|(rps, _)| rps)
            };
            rows.push((
                format!("HTTPS requests/s, {threads} client(s)"),
                [
                    measure(None, &remote_roots)?,
                    measure(Some(&sni_ns), &remote_roots)?,
                    measure(Some(&mitm_ns), &run_roots)?,
                ],
            ));
        }
        let download = |ns: Option<&OwnedFd>, roots: &Arc<rustls::ClientConfig>| {
            egress_tls::rate(ns, roots.clone(), to, 1, 1, bytes).map(|(_, mbs)| mbs)
        };
        rows.push((
            format!("HTTPS download, {} MiB, MB/s", bytes >> 20),
            [
                download(None, &remote_roots)?,
                download(Some(&sni_ns), &remote_roots)?,
                download(Some(&mitm_ns), &run_roots)?,
            ],
        ));
        Ok(rows)
    })
    .await??;
    let sni_logs = sni.close().await.rest;
    let mitm_logs = mitm.close().await.rest;
    let modes = |logs: &[vm0_egress::NetworkLog]| {
        let mut seen: Vec<String> = logs
            .iter()
            .map(|l| l.metadata()["mode"].as_str().unwrap_or("?").to_owned())
            .collect();
        seen.sort();
        seen.dedup();
        seen.join(",")
    };
    println!("| | direct | through the proxy (SNI) | secretHeaders (TLS ended) | ratios |");
    println!("| --- | --- | --- | --- | --- |");
    for (what, [direct, sni, mitm]) in &rows {
        println!(
            "| {what} | {direct:.0} | {sni:.0} | {mitm:.0} | {:.2} / {:.2} |",
            sni / direct,
            mitm / direct
        );
    }
    println!(
        "(logged: {} by {}, {} by {})",
        sni_logs.len(),
        modes(&sni_logs),
        mitm_logs.len(),
        modes(&mitm_logs)
    );
    Ok(())
}

/// How long a run's network takes to set up, for each link, `n` times.
async fn setup_times(egress: &Egress, n: usize) -> Result<()> {
    let who = if nix::unistd::geteuid().is_root() {
        "root worker"
    } else {
        "unprivileged worker"
    };
    for (link, what) in [
        (Link::Loopback, "bubblewrap"),
        (Link::Tap, "microVM, with its tap"),
    ] {
        let mut setups = Vec::with_capacity(n);
        for _ in 0..n {
            let started = Instant::now();
            let run = egress.open(Policy::default(), link, None).await?;
            setups.push(started.elapsed());
            run.close().await;
        }
        setups.sort();
        println!(
            "a run's network set up, {what}, {who} ({} times): p50 {:?}, p99 {:?}, max {:?}",
            setups.len(),
            percentile(&setups, 0.5),
            percentile(&setups, 0.99),
            setups[setups.len() - 1]
        );
    }
    Ok(())
}
