//! A run's network namespace, in one of two shapes ([`Link`]):
//!
//! - **Loopback** (processes join it: bubblewrap): only `lo`, every IPv4
//!   address local to it (so a connection anywhere is a connection inside), and
//!   nftables steering what the sandbox sends (the `output` hook) into the
//!   proxy's two sockets, which live in it.
//! - **Tap** (a VM's network card is backed by it: QEMU): `lo` and a tap
//!   device, [`TAP_GATEWAY`] on the host's side of it and [`TAP_GUEST`] the
//!   guest's, and nftables steering what arrives from the tap (the `prerouting`
//!   hook) into the proxy's sockets, bound on the gateway address. Nothing is
//!   forwarded. The worker opens the tap and hands its descriptor to the VMM,
//!   which itself stays in an empty namespace of its own.
//!
//! Either way: TCP goes to [`PROXY_PORT`], DNS (UDP 53) to [`DNS_PORT`],
//! everything else is dropped. The namespace has no interface to anywhere:
//! nothing the sandbox sends can reach a network but through the proxy, and the
//! sandbox (no capabilities in it) cannot change that. It lives as long as its
//! descriptors, its sockets and the processes in it: nothing to remove when a
//! run ends or a worker dies (a tap that is not persistent goes with its last
//! descriptor).
//!
//! A root worker makes the namespace on a thread of its own; an unprivileged
//! one in a user namespace of its own that owns it ([`owned`]), which the
//! sandbox joins too (and, joined by a uid other than 0, holds no capability
//! in). Same rules, same sockets.

use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::EgressError;

mod owned;

/// Where the proxy listens in a run's namespace (loopback; connections are
/// redirected there, their destination kept as the original one).
pub const PROXY_PORT: u16 = 15001;
pub const DNS_PORT: u16 = 15053;
/// The resolver the sandbox's `/etc/resolv.conf` names (any address would do:
/// every lookup is redirected).
pub const RESOLVER: &str = "10.0.2.3";

/// The tap device's name, in the run's namespace.
pub const TAP_NAME: &str = "tap0";
/// The namespace's side of the tap: the guest's gateway (and, redirected,
/// where the proxy listens). Link-local, which the proxy always refuses as a
/// destination: the guest reaches nothing of its host's side but the proxy.
pub const TAP_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 100, 1);
/// The guest's address on its one network card.
pub const TAP_GUEST: Ipv4Addr = Ipv4Addr::new(169, 254, 100, 2);
pub const TAP_PREFIX: u8 = 30;

/// How the sandbox is attached to its namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// The sandbox's processes join the namespace.
    Loopback,
    /// A VM's network card is backed by a tap device in it.
    Tap,
}

pub(crate) struct Namespace {
    pub fd: OwnedFd,
    /// The user namespace that owns it (an unprivileged worker's), which
    /// whoever joins `fd` joins first.
    pub user: Option<OwnedFd>,
    /// The tap's descriptor (a [`Link::Tap`] namespace).
    pub tap: Option<OwnedFd>,
    pub tcp: std::net::TcpListener,
    pub udp: std::net::UdpSocket,
}

#[derive(Debug, Clone)]
pub(crate) struct Tools {
    pub ip: PathBuf,
    pub nft: PathBuf,
}

/// What bounds a namespace's connection tracking, whose entries are kernel
/// memory no cgroup of the run's counts: new connections (and DNS queries) a
/// second, and short timeouts for what is closing or closed (a connection to
/// the proxy never leaves the host: no delayed segment to wait for). With the
/// proxy's limit on open connections, what a run can make the kernel hold is
/// about `per_second` times the 10 s of a half-open entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tracking {
    /// New connections and DNS queries a run may start each second (bursts
    /// of twice that); 0: no limit.
    pub per_second: u32,
}

/// The counter of what [`Tracking::per_second`] refused.
pub(crate) const OVER_RATE: &str = "over_rate";

fn tracking_objects() -> &'static str {
    "  counter over_rate {
  }
  ct timeout tcp_local {
    protocol tcp; l3proto ip;
    policy = { syn_sent: 10, syn_recv: 10, fin_wait: 10, close_wait: 10, last_ack: 10, time_wait: 1, close: 1 }
  }
  ct timeout udp_local {
    protocol udp; l3proto ip;
    policy = { unreplied: 10, replied: 2 }
  }
"
}

/// Rules for a chain that sees a connection's first packet before conntrack
/// confirms it: its timeouts, and the rate of new ones (a TCP connection over
/// it is reset, a DNS query dropped).
fn tracking_rules(tracking: Tracking) -> String {
    let mut rules = String::from(
        "    ct state new meta l4proto tcp ct timeout set \"tcp_local\"
    ct state new meta l4proto udp ct timeout set \"udp_local\"
",
    );
    if tracking.per_second > 0 {
        let (rate, burst) = (tracking.per_second, tracking.per_second.saturating_mul(2));
        rules.push_str(&format!(
            "    ct state new meta l4proto tcp limit rate over {rate}/second burst {burst} packets counter name {OVER_RATE} reject with tcp reset
    ct state new meta l4proto udp limit rate over {rate}/second burst {burst} packets counter name {OVER_RATE} drop
"
        ));
    }
    rules
}

fn loopback_rules(tracking: Tracking) -> String {
    format!(
        "table ip vm0 {{
{objects}  chain steer {{
    type nat hook output priority -100; policy accept;
    ip daddr 127.0.0.0/8 return
    udp dport 53 redirect to :{DNS_PORT}
    meta l4proto tcp redirect to :{PROXY_PORT}
  }}
  chain only_steered {{
    type filter hook output priority 0; policy accept;
{bounded}    ip daddr != 127.0.0.0/8 drop
  }}
}}
table ip6 vm0 {{
  chain only_loopback {{
    type filter hook output priority 0; policy accept;
    ip6 daddr != ::1 drop
  }}
}}
",
        objects = tracking_objects(),
        bounded = tracking_rules(tracking),
    )
}

fn tap_rules(tracking: Tracking) -> String {
    format!(
        "table ip vm0 {{
{objects}  chain steer {{
    type nat hook prerouting priority -100; policy accept;
    iifname != \"{TAP_NAME}\" return
    udp dport 53 redirect to :{DNS_PORT}
    meta l4proto tcp redirect to :{PROXY_PORT}
  }}
  chain only_steered {{
    type filter hook input priority 0; policy drop;
    iifname \"lo\" accept
{bounded}    tcp dport {PROXY_PORT} accept
    udp dport {DNS_PORT} accept
  }}
  chain nothing_forwarded {{
    type filter hook forward priority 0; policy drop;
  }}
}}
table ip6 vm0 {{
  chain only_loopback {{
    type filter hook input priority 0; policy drop;
    iifname \"lo\" accept
  }}
  chain nothing_forwarded {{
    type filter hook forward priority 0; policy drop;
  }}
}}
",
        objects = tracking_objects(),
        bounded = tracking_rules(tracking),
    )
}

/// The namespace (its owning user namespace when not the caller's, net) a
/// tool must enter; `None`: the caller's.
type Inside<'a> = Option<(Option<&'a OwnedFd>, &'a OwnedFd)>;

/// Runs a tool (in `inside` when given), `stdin` its input: what it printed.
fn run(program: &Path, args: &[&str], stdin: &str, inside: Inside) -> Result<String, EgressError> {
    let what = || format!("{} {}", program.display(), args.join(" "));
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some((user, net)) = inside {
        owned::enter(&mut cmd, user.map(AsRawFd::as_raw_fd), net.as_raw_fd());
    }
    let mut child = cmd
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
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What the rate of new connections refused in the namespace `net` (owned by
/// `user` when not the worker's), so far: packets counted by [`OVER_RATE`].
pub(crate) fn refused_over_rate(
    tools: &Tools,
    user: Option<&OwnedFd>,
    net: &OwnedFd,
) -> Result<u64, EgressError> {
    let listed = run(
        &tools.nft,
        &["list", "counter", "ip", "vm0", OVER_RATE],
        "",
        Some((user, net)),
    )?;
    listed
        .split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| EgressError::Setup(format!("nft's counter {OVER_RATE}: {listed:?}")))
}

/// What a namespace's `ip` is told, and the rules `nft` loads, for `link`;
/// and where the proxy's sockets are bound.
fn setup_for(link: Link, tracking: Tracking) -> (String, String, Ipv4Addr) {
    match link {
        Link::Loopback => (
            "link set lo up\nroute add local 0.0.0.0/0 dev lo table local src 127.0.0.1\n".into(),
            loopback_rules(tracking),
            Ipv4Addr::LOCALHOST,
        ),
        Link::Tap => (
            format!(
                "link set lo up\nlink set {TAP_NAME} up\naddr add {TAP_GATEWAY}/{TAP_PREFIX} dev {TAP_NAME}\n"
            ),
            tap_rules(tracking),
            TAP_GATEWAY,
        ),
    }
}

/// Makes a run's namespace: as root on a thread of the worker's, otherwise
/// owned by a user namespace of its own.
pub(crate) fn create(
    tools: &Tools,
    link: Link,
    tracking: Tracking,
) -> Result<Namespace, EgressError> {
    if nix::unistd::geteuid().is_root() {
        create_on_thread(tools, link, tracking)
    } else {
        create_owned(tools, link, tracking)
    }
}

/// A namespace belongs to the thread that unshares it, and to the processes
/// it starts.
fn create_on_thread(
    tools: &Tools,
    link: Link,
    tracking: Tracking,
) -> Result<Namespace, EgressError> {
    let tools = tools.clone();
    std::thread::Builder::new()
        .name("vm0-netns".into())
        .spawn(move || -> Result<Namespace, EgressError> {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| EgressError::Setup(format!("unshare(CLONE_NEWNET): {e}")))?;
            let tap = match link {
                Link::Loopback => None,
                Link::Tap => Some(
                    tap::open(TAP_NAME)
                        .map_err(|e| EgressError::Setup(format!("the tap device: {e}")))?,
                ),
            };
            let (addresses, rules, listen) = setup_for(link, tracking);
            run(&tools.ip, &["-batch", "-"], &addresses, None)?;
            run(&tools.nft, &["-f", "-"], &rules, None)?;
            let fd = std::fs::File::open("/proc/thread-self/ns/net")
                .map_err(|e| EgressError::Setup(format!("/proc/thread-self/ns/net: {e}")))?;
            let tcp = std::net::TcpListener::bind((listen, PROXY_PORT))
                .map_err(|e| EgressError::Setup(format!("the proxy's listener: {e}")))?;
            let udp = std::net::UdpSocket::bind((listen, DNS_PORT))
                .map_err(|e| EgressError::Setup(format!("the resolver's socket: {e}")))?;
            Ok(Namespace {
                fd: fd.into(),
                user: None,
                tap,
                tcp,
                udp,
            })
        })
        .map_err(|e| EgressError::Setup(format!("a thread: {e}")))?
        .join()
        .map_err(|_| EgressError::Setup("the namespace's thread panicked".into()))?
}

/// An unprivileged worker's: the namespaces, the tap and the sockets made by
/// a child ([`owned::make`]), then `ip` and `nft` run inside.
fn create_owned(tools: &Tools, link: Link, tracking: Tracking) -> Result<Namespace, EgressError> {
    let (addresses, rules, listen) = setup_for(link, tracking);
    let tap = (link == Link::Tap).then_some(TAP_NAME);
    let made = owned::make(tap, listen, PROXY_PORT, DNS_PORT)?;
    let inside = Some((Some(&made.user), &made.net));
    run(&tools.ip, &["-batch", "-"], &addresses, inside)?;
    run(&tools.nft, &["-f", "-"], &rules, inside)?;
    Ok(Namespace {
        fd: made.net,
        user: Some(made.user),
        tap: made.tap,
        tcp: made.tcp.into(),
        udp: made.udp.into(),
    })
}

/// Tap devices, opened through `/dev/net/tun`.
mod tap {
    use std::os::fd::OwnedFd;

    use nix::libc;

    /// `_IOW('T', 202, int)`, though it takes a `struct ifreq`.
    pub(super) const TUNSETIFF: nix::sys::ioctl::ioctl_num_type =
        nix::request_code_write!(b'T', 202, std::mem::size_of::<libc::c_int>());

    nix::ioctl_write_ptr_bad!(tun_set_iff, TUNSETIFF, libc::ifreq);

    /// The request for a tap device named `name`, without packet information
    /// and with virtio-net headers (the VMM can offload checksums and
    /// segmentation). Not persistent: it goes with its last descriptor.
    #[allow(unsafe_code)]
    pub(super) fn request(name: &str) -> std::io::Result<libc::ifreq> {
        // SAFETY: `ifreq` is plain old data, for which all zeroes is valid.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        if name.len() >= req.ifr_name.len() {
            return Err(std::io::Error::other("tap name too long"));
        }
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        Ok(req)
    }

    /// A tap device named `name` in the calling thread's namespace.
    #[allow(unsafe_code)]
    pub(super) fn open(name: &str) -> std::io::Result<OwnedFd> {
        let req = request(name)?;
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        // SAFETY: `tun` is an open /dev/net/tun and `req` a valid, NUL-terminated
        // ifreq that outlives the call; the kernel only reads and writes it.
        unsafe { tun_set_iff(std::os::fd::AsRawFd::as_raw_fd(&tun), &req) }
            .map_err(std::io::Error::from)?;
        Ok(tun.into())
    }
}
