//! `vm0-egress-bench`: the worker's egress proxy against a direct connection, on
//! this machine. A "remote" host is a network namespace behind a veth pair; a
//! client in a run's namespace reaches it through the proxy, the same client in
//! the worker's namespace directly. Measures stream throughput (one and ten
//! streams), connections per second, and the time a run's network takes to set
//! up. Needs root (namespaces), `ip` and `nft`.

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
    let remote = Remote::start()?;
    remote.serve()?;
    let trusted = Cidr::parse("10.250.0.0/16").context("cidr")?;
    let egress = Egress::new(
        EgressConfig::new(
            AlwaysRefused {
                trusted: vec![trusted],
                own: vm0_egress::proxy::host_addresses(),
                endpoints: Vec::new(),
            },
            1024,
        ),
        Link::Loopback,
    )?;
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
    let (logs, dropped) = run.close().await;
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
    for (link, what) in [
        (Link::Loopback, "bubblewrap"),
        (Link::Tap, "microVM, with its tap"),
    ] {
        let mut setups = Vec::with_capacity(args.setups);
        for _ in 0..args.setups {
            let started = Instant::now();
            let run = egress.open(Policy::default(), link, None).await?;
            setups.push(started.elapsed());
            run.close().await;
        }
        setups.sort();
        println!(
            "a run's network set up, {what} ({} times): p50 {:?}, p99 {:?}, max {:?}",
            setups.len(),
            percentile(&setups, 0.5),
            percentile(&setups, 0.99),
            setups[setups.len() - 1]
        );
    }
    Ok(())
}
