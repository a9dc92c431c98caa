//! A run's network namespace: only `lo`, every IPv4 address local to it (so a
//! connection anywhere is a connection inside), and nftables steering what
//! leaves the sandbox into the proxy's two sockets, which live in it: TCP to
//! [`PROXY_PORT`], DNS (UDP 53) to [`DNS_PORT`], everything else dropped. The
//! namespace has no interface to anywhere: nothing the sandbox sends can reach
//! a network but through the proxy, and the sandbox (no capabilities in it)
//! cannot change that. It lives as long as its descriptor, its sockets and the
//! processes in it: nothing to remove when a run ends or a worker dies.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::EgressError;

/// Where the proxy listens in a run's namespace (loopback; connections are
/// redirected there, their destination kept as the original one).
pub const PROXY_PORT: u16 = 15001;
pub const DNS_PORT: u16 = 15053;
/// The resolver the sandbox's `/etc/resolv.conf` names (any address would do:
/// every lookup is redirected).
pub const RESOLVER: &str = "10.0.2.3";

pub(crate) struct Namespace {
    pub fd: OwnedFd,
    pub tcp: std::net::TcpListener,
    pub udp: std::net::UdpSocket,
}

#[derive(Debug, Clone)]
pub(crate) struct Tools {
    pub ip: PathBuf,
    pub nft: PathBuf,
}

fn rules() -> String {
    format!(
        "table ip vm0 {{
  chain steer {{
    type nat hook output priority -100; policy accept;
    ip daddr 127.0.0.0/8 return
    udp dport 53 redirect to :{DNS_PORT}
    meta l4proto tcp redirect to :{PROXY_PORT}
  }}
  chain only_steered {{
    type filter hook output priority 0; policy accept;
    ip daddr != 127.0.0.0/8 drop
  }}
}}
table ip6 vm0 {{
  chain only_loopback {{
    type filter hook output priority 0; policy accept;
    ip6 daddr != ::1 drop
  }}
}}
"
    )
}

fn run(program: &Path, args: &[&str], stdin: &str) -> Result<(), EgressError> {
    let what = || format!("{} {}", program.display(), args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| EgressError::Setup(format!("{}: {e}", what())))?;
    if let Some(mut input) = child.stdin.take() {
        input
            .write_all(stdin.as_bytes())
            .map_err(|e| EgressError::Setup(format!("{}: {e}", what())))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| EgressError::Setup(format!("{}: {e}", what())))?;
    if !out.status.success() {
        return Err(EgressError::Setup(format!(
            "{}: {}",
            what(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Makes a namespace on a thread of its own (a namespace belongs to the
/// thread that unshares it, and to the processes it starts).
pub(crate) fn create(tools: &Tools) -> Result<Namespace, EgressError> {
    let tools = tools.clone();
    std::thread::Builder::new()
        .name("vm0-netns".into())
        .spawn(move || -> Result<Namespace, EgressError> {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| EgressError::Setup(format!("unshare(CLONE_NEWNET): {e}")))?;
            run(
                &tools.ip,
                &["-batch", "-"],
                "link set lo up\nroute add local 0.0.0.0/0 dev lo table local src 127.0.0.1\n",
            )?;
            run(&tools.nft, &["-f", "-"], &rules())?;
            let fd = std::fs::File::open("/proc/thread-self/ns/net")
                .map_err(|e| EgressError::Setup(format!("/proc/thread-self/ns/net: {e}")))?;
            let tcp = std::net::TcpListener::bind(("127.0.0.1", PROXY_PORT))
                .map_err(|e| EgressError::Setup(format!("the proxy's listener: {e}")))?;
            let udp = std::net::UdpSocket::bind(("127.0.0.1", DNS_PORT))
                .map_err(|e| EgressError::Setup(format!("the resolver's socket: {e}")))?;
            Ok(Namespace {
                fd: fd.into(),
                tcp,
                udp,
            })
        })
        .map_err(|e| EgressError::Setup(format!("a thread: {e}")))?
        .join()
        .map_err(|_| EgressError::Setup("the namespace's thread panicked".into()))?
}
