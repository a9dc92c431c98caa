//! A run's namespace under an unprivileged worker: owned by a user namespace
//! of the worker's (its uid and gid mapped to themselves, nothing else), which
//! gives the worker the capabilities to set it up and nobody else any.
//!
//! A multithreaded process may neither create a user namespace nor join one,
//! so a forked child does the part that must happen inside (it unshares, maps
//! its ids, opens the tap and binds the proxy's sockets) and passes the
//! descriptors back over a socket pair before it exits; `ip` and `nft` then run
//! in the namespace through [`enter`] (which also serves a root worker's later
//! reads of its namespaces). The child runs between `fork` and
//! `_exit` of a multithreaded parent: only system calls, on memory prepared
//! before the fork. This module is the crate's only `unsafe` besides the tap's
//! ioctl.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io::IoSliceMut;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::libc;
use nix::sys::socket::{
    AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg, socketpair,
};

use crate::EgressError;

/// What the child made, in the parent.
pub(super) struct Made {
    pub user: OwnedFd,
    pub net: OwnedFd,
    pub tap: Option<OwnedFd>,
    pub tcp: OwnedFd,
    pub udp: OwnedFd,
}

/// What the child does, in order: the step that failed names the error.
const STEPS: [&str; 11] = [
    "unshare(CLONE_NEWUSER | CLONE_NEWNET)",
    "/proc/self/setgroups",
    "/proc/self/uid_map",
    "/proc/self/gid_map",
    "/proc/self/ns/user",
    "/proc/self/ns/net",
    "/dev/net/tun",
    "the tap device (TUNSETIFF)",
    "the proxy's listener",
    "the resolver's socket",
    "passing the descriptors back",
];

/// The step of [`STEPS`] that opens `/dev/net/tun` (1-based).
const TUN_STEP: u8 = 7;

/// Everything the child touches, made before the fork (it may not allocate).
struct Plan {
    setgroups: CString,
    uid_map: CString,
    gid_map: CString,
    uid_line: Vec<u8>,
    gid_line: Vec<u8>,
    user_ns: CString,
    net_ns: CString,
    tun: CString,
    tap: Option<libc::ifreq>,
    tcp: libc::sockaddr_in,
    udp: libc::sockaddr_in,
}

fn sockaddr(ip: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn cstring(s: &str) -> CString {
    // Only this module's constants: none holds a NUL.
    CString::new(s).unwrap_or_default()
}

/// Makes the namespaces and, inside them, the tap (when `tap` names one) and
/// the proxy's sockets, bound on `listen`.
pub(super) fn make(
    tap: Option<&str>,
    listen: Ipv4Addr,
    tcp_port: u16,
    udp_port: u16,
) -> Result<Made, EgressError> {
    let setup = |what: &str, e: &dyn std::fmt::Display| EgressError::Setup(format!("{what}: {e}"));
    let tap = match tap {
        None => None,
        Some(name) => Some(super::tap::request(name).map_err(|e| setup("the tap device", &e))?),
    };
    let plan = Plan {
        setgroups: cstring("/proc/self/setgroups"),
        uid_map: cstring("/proc/self/uid_map"),
        gid_map: cstring("/proc/self/gid_map"),
        uid_line: format!("{0} {0} 1\n", nix::unistd::geteuid()).into_bytes(),
        gid_line: format!("{0} {0} 1\n", nix::unistd::getegid()).into_bytes(),
        user_ns: cstring("/proc/self/ns/user"),
        net_ns: cstring("/proc/self/ns/net"),
        tun: cstring("/dev/net/tun"),
        tap,
        tcp: sockaddr(listen, tcp_port),
        udp: sockaddr(listen, udp_port),
    };
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| setup("a socket pair", &e))?;
    // SAFETY: the child only makes system calls on `plan` and `theirs`, which
    // were made before the fork, and ends with `_exit`; it never returns here.
    let child = match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => unsafe { in_child(&plan, theirs.as_raw_fd()) },
        Ok(nix::unistd::ForkResult::Parent { child }) => child,
        Err(e) => return Err(setup("fork", &e)),
    };
    drop(theirs);
    let answer = receive(&ours);
    let _ = nix::sys::wait::waitpid(child, None);
    answer
}

/// The child's answer: the descriptors, or the step that failed and its errno.
fn receive(ours: &OwnedFd) -> Result<Made, EgressError> {
    let mut data = [0u8; 8];
    let mut iov = [IoSliceMut::new(&mut data)];
    let mut space = nix::cmsg_space!([RawFd; 5]);
    let msg = recvmsg::<()>(
        ours.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| EgressError::Setup(format!("the namespace's answer: {e}")))?;
    let mut fds = Vec::new();
    for cmsg in msg
        .cmsgs()
        .map_err(|e| EgressError::Setup(format!("the namespace's answer: {e}")))?
    {
        if let ControlMessageOwned::ScmRights(got) = cmsg {
            // SAFETY: descriptors the kernel just installed in this process
            // for us, owned by nothing else.
            fds.extend(
                got.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    let n = msg.bytes;
    if n == 0 {
        return Err(EgressError::Setup(
            "the namespace's process ended without an answer".into(),
        ));
    }
    if data[0] != 0 {
        let step = STEPS
            .get(usize::from(data[0]) - 1)
            .copied()
            .unwrap_or("an unknown step");
        let errno = i32::from_ne_bytes([data[1], data[2], data[3], data[4]]);
        let hint = if data[0] == TUN_STEP && errno == libc::EACCES {
            " (an unprivileged worker's microVMs need it open to every user, mode 0666 as Debian's udev makes it)"
        } else {
            ""
        };
        return Err(EgressError::Setup(format!(
            "{step}: {}{hint}",
            std::io::Error::from_raw_os_error(errno)
        )));
    }
    let mut fds = fds.into_iter();
    let mut next = || {
        fds.next()
            .ok_or_else(|| EgressError::Setup("the namespace's answer lacks descriptors".into()))
    };
    let (user, net) = (next()?, next()?);
    let tap = if data[1] == 1 { Some(next()?) } else { None };
    let (tcp, udp) = (next()?, next()?);
    Ok(Made {
        user,
        net,
        tap,
        tcp,
        udp,
    })
}

/// `Err((step, errno))`: the step is 1-based into [`STEPS`].
type Step = Result<libc::c_int, (u8, i32)>;

fn check(ret: libc::c_int, step: u8) -> Step {
    if ret < 0 {
        Err((step, nix::errno::Errno::last_raw()))
    } else {
        Ok(ret)
    }
}

/// Writes `line` to the file at `path` (one `write`, as proc's maps ask).
unsafe fn write_file(path: &CString, line: &[u8], step: u8) -> Step {
    let fd = check(
        unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) },
        step,
    )?;
    let n = unsafe { libc::write(fd, line.as_ptr().cast(), line.len()) };
    let written = if n < 0 {
        Err((step, nix::errno::Errno::last_raw()))
    } else {
        Ok(0)
    };
    unsafe { libc::close(fd) };
    written
}

unsafe fn bound_socket(kind: libc::c_int, addr: &libc::sockaddr_in, step: u8) -> Step {
    let fd = check(
        unsafe { libc::socket(libc::AF_INET, kind | libc::SOCK_CLOEXEC, 0) },
        step,
    )?;
    // The address may not be up yet (`ip` brings it up after).
    let one: libc::c_int = 1;
    let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    check(
        unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_IP,
                libc::IP_FREEBIND,
                (&raw const one).cast(),
                len,
            )
        },
        step,
    )?;
    let addr_len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    check(
        unsafe { libc::bind(fd, (addr as *const libc::sockaddr_in).cast(), addr_len) },
        step,
    )?;
    if kind == libc::SOCK_STREAM {
        check(unsafe { libc::listen(fd, libc::SOMAXCONN) }, step)?;
    }
    Ok(fd)
}

/// The child's work: the descriptors to pass back (user, net, tap?, tcp, udp)
/// and how many there are.
unsafe fn build(plan: &Plan) -> Result<([RawFd; 5], usize), (u8, i32)> {
    check(
        unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) },
        1,
    )?;
    unsafe { write_file(&plan.setgroups, b"deny", 2) }?;
    unsafe { write_file(&plan.uid_map, &plan.uid_line, 3) }?;
    unsafe { write_file(&plan.gid_map, &plan.gid_line, 4) }?;
    let mut fds = [-1; 5];
    let mut n = 0;
    for (path, step) in [(&plan.user_ns, 5), (&plan.net_ns, 6)] {
        fds[n] = check(
            unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) },
            step,
        )?;
        n += 1;
    }
    if let Some(req) = &plan.tap {
        let tun = check(
            unsafe { libc::open(plan.tun.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) },
            TUN_STEP,
        )?;
        check(
            unsafe { libc::ioctl(tun, super::tap::TUNSETIFF, req as *const libc::ifreq) },
            8,
        )?;
        fds[n] = tun;
        n += 1;
    }
    fds[n] = unsafe { bound_socket(libc::SOCK_STREAM, &plan.tcp, 9) }?;
    fds[n + 1] = unsafe { bound_socket(libc::SOCK_DGRAM, &plan.udp, 10) }?;
    Ok((fds, n + 2))
}

/// Room for five descriptors' control message, aligned as `cmsghdr` wants.
#[repr(C, align(8))]
struct ControlBuf([u8; 64]);

/// Sends `data` and `fds` on `chan` (one datagram).
unsafe fn send(chan: RawFd, data: &[u8], fds: &[RawFd]) -> libc::ssize_t {
    let mut control = ControlBuf([0; 64]);
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: all zeroes is a valid msghdr (no name, no control).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let len = std::mem::size_of_val(fds) as libc::c_uint;
        msg.msg_control = control.0.as_mut_ptr().cast();
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(len) } as usize;
        let cmsg = unsafe { libc::CMSG_FIRSTHDR(&raw const msg) };
        unsafe {
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(len) as usize;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(cmsg).cast::<RawFd>(),
                fds.len(),
            );
        }
    }
    unsafe { libc::sendmsg(chan, &raw const msg, 0) }
}

/// The forked child: makes everything, answers, exits.
unsafe fn in_child(plan: &Plan, chan: RawFd) -> ! {
    let code = match unsafe { build(plan) } {
        Ok((fds, n)) => {
            let with_tap = u8::from(plan.tap.is_some());
            if unsafe { send(chan, &[0, with_tap], &fds[..n]) } < 0 {
                let e = nix::errno::Errno::last_raw().to_ne_bytes();
                unsafe { send(chan, &[11, e[0], e[1], e[2], e[3]], &[]) };
                1
            } else {
                0
            }
        }
        Err((step, errno)) => {
            let e = errno.to_ne_bytes();
            unsafe { send(chan, &[step, e[0], e[1], e[2], e[3]], &[]) };
            1
        }
    };
    unsafe { libc::_exit(code) }
}

/// Starts `cmd` in the network namespace `net`, entering `user` (which owns
/// it) first when given, with `CAP_NET_ADMIN` there: joining a user namespace
/// gives every capability in it, but an `exec` by a uid other than 0 keeps
/// only the ambient ones. Without `user` (a root worker) root keeps its own.
pub(super) fn enter(cmd: &mut Command, user: Option<RawFd>, net: RawFd) {
    // SAFETY: between fork and exec only system calls, on the stack.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(user) = user
                && libc::setns(user, libc::CLONE_NEWUSER) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setns(net, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            match user {
                Some(_) => raise_ambient(CAP_NET_ADMIN),
                None => Ok(()),
            }
        });
    }
}

const CAP_NET_ADMIN: u32 = 12;
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Makes `cap` (held, permitted) inheritable and ambient, so that it survives
/// `exec`.
unsafe fn raise_ambient(cap: u32) -> std::io::Result<()> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    let word = (cap / 32) as usize;
    let bit = 1u32 << (cap % 32);
    unsafe {
        if libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        data[word].inheritable |= bit;
        if libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) != 0
            || libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                libc::c_ulong::from(cap),
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
