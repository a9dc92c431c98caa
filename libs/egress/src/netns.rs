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

use std::io::Write;
use std::net::Ipv4Addr;
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

fn loopback_rules() -> String {
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

fn tap_rules() -> String {
    format!(
        "table ip vm0 {{
  chain steer {{
    type nat hook prerouting priority -100; policy accept;
    iifname != \"{TAP_NAME}\" return
    udp dport 53 redirect to :{DNS_PORT}
    meta l4proto tcp redirect to :{PROXY_PORT}
  }}
  chain only_steered {{
    type filter hook input priority 0; policy drop;
    iifname \"lo\" accept
    tcp dport {PROXY_PORT} accept
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
pub(crate) fn create(tools: &Tools, link: Link) -> Result<Namespace, EgressError> {
    let tools = tools.clone();
    std::thread::Builder::new()
        .name("vm0-netns".into())
        .spawn(move || -> Result<Namespace, EgressError> {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| EgressError::Setup(format!("unshare(CLONE_NEWNET): {e}")))?;
            let (tap, listen) = match link {
                Link::Loopback => {
                    run(
                        &tools.ip,
                        &["-batch", "-"],
                        "link set lo up\nroute add local 0.0.0.0/0 dev lo table local src 127.0.0.1\n",
                    )?;
                    run(&tools.nft, &["-f", "-"], &loopback_rules())?;
                    (None, Ipv4Addr::LOCALHOST)
                }
                Link::Tap => {
                    let tap = tap::open(TAP_NAME)
                        .map_err(|e| EgressError::Setup(format!("the tap device: {e}")))?;
                    run(
                        &tools.ip,
                        &["-batch", "-"],
                        &format!(
                            "link set lo up\nlink set {TAP_NAME} up\naddr add {TAP_GATEWAY}/{TAP_PREFIX} dev {TAP_NAME}\n"
                        ),
                    )?;
                    run(&tools.nft, &["-f", "-"], &tap_rules())?;
                    (Some(tap), TAP_GATEWAY)
                }
            };
            let fd = std::fs::File::open("/proc/thread-self/ns/net")
                .map_err(|e| EgressError::Setup(format!("/proc/thread-self/ns/net: {e}")))?;
            let tcp = std::net::TcpListener::bind((listen, PROXY_PORT))
                .map_err(|e| EgressError::Setup(format!("the proxy's listener: {e}")))?;
            let udp = std::net::UdpSocket::bind((listen, DNS_PORT))
                .map_err(|e| EgressError::Setup(format!("the resolver's socket: {e}")))?;
            Ok(Namespace {
                fd: fd.into(),
                tap,
                tcp,
                udp,
            })
        })
        .map_err(|e| EgressError::Setup(format!("a thread: {e}")))?
        .join()
        .map_err(|_| EgressError::Setup("the namespace's thread panicked".into()))?
}

/// Tap devices, opened through `/dev/net/tun`.
mod tap {
    use std::os::fd::OwnedFd;

    use nix::libc;

    // TUNSETIFF is _IOW('T', 202, int), though it takes a `struct ifreq`.
    nix::ioctl_write_ptr_bad!(
        tun_set_iff,
        nix::request_code_write!(b'T', 202, std::mem::size_of::<libc::c_int>()),
        libc::ifreq
    );

    /// A tap device named `name` in the calling thread's namespace, without
    /// packet information and with virtio-net headers (the VMM can offload
    /// checksums and segmentation). Not persistent: it goes with its last
    /// descriptor.
    #[allow(unsafe_code)]
    pub(super) fn open(name: &str) -> std::io::Result<OwnedFd> {
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        // SAFETY: `ifreq` is plain old data, for which all zeroes is valid.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        if name.len() >= req.ifr_name.len() {
            return Err(std::io::Error::other("tap name too long"));
        }
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        // SAFETY: `tun` is an open /dev/net/tun and `req` a valid, NUL-terminated
        // ifreq that outlives the call; the kernel only reads and writes it.
        unsafe { tun_set_iff(std::os::fd::AsRawFd::as_raw_fd(&tun), &req) }
            .map_err(std::io::Error::from)?;
        Ok(tun.into())
    }
}
