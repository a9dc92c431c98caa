//! `vm0-guest-agent probe [--connect HOST:PORT]...`: from inside a sandbox, tries
//! what the jail must refuse and prints one line per attempt, so that an operator
//! (and the hostile-agent test suite) can see what a run's command can reach:
//!
//! ```text
//! probe unshare-user: refused (EPERM)
//! probe connect 127.0.0.1:8080: refused (Connection refused)
//! ```
//!
//! Every attempt is harmless when it succeeds (a namespace of its own that the
//! probe leaves by exiting, a tmpfs nobody uses, descriptors closed at once).

use std::time::Duration;

use nix::errno::Errno;
use nix::sched::{CloneFlags, unshare};

/// One attempt's outcome.
enum Outcome {
    Allowed,
    Refused(String),
}

fn line(name: &str, outcome: Outcome) {
    match outcome {
        Outcome::Allowed => println!("probe {name}: allowed"),
        Outcome::Refused(why) => println!("probe {name}: refused ({why})"),
    }
}

fn errno(e: Errno) -> Outcome {
    Outcome::Refused(format!("{e:?}"))
}

/// A raw syscall's result: a descriptor it returned is closed.
fn raw(ret: i64, returns_fd: bool) -> Outcome {
    if ret < 0 {
        return errno(Errno::last());
    }
    if returns_fd && let Ok(fd) = i32::try_from(ret) {
        let _ = nix::unistd::close(fd);
    }
    Outcome::Allowed
}

pub fn run(args: &[&str]) -> std::process::ExitCode {
    let mut connects = Vec::new();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match (*arg, rest.next()) {
            ("--connect", Some(addr)) => connects.push((*addr).to_owned()),
            _ => {
                eprintln!("usage: vm0-guest-agent probe [--connect HOST:PORT]...");
                return std::process::ExitCode::from(2);
            }
        }
    }
    // Each namespace probe runs in a child, so that one that succeeds does not
    // change what the next one sees.
    for (name, flags) in [
        ("unshare-user", CloneFlags::CLONE_NEWUSER),
        ("unshare-mount", CloneFlags::CLONE_NEWNS),
        ("unshare-net", CloneFlags::CLONE_NEWNET),
    ] {
        line(name, in_child(move || unshare(flags).map_err(errno)));
    }
    line(
        "mount",
        in_child(|| {
            let dir = std::env::temp_dir().join(format!("vm0-probe-{}", std::process::id()));
            let _ = std::fs::create_dir(&dir);
            let result = nix::mount::mount(
                Some("none"),
                &dir,
                Some("tmpfs"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            );
            if result.is_ok() {
                let _ = nix::mount::umount(&dir);
            }
            let _ = std::fs::remove_dir(&dir);
            result.map_err(errno)
        }),
    );
    for (name, ret, fd) in sys::attempts() {
        line(name, raw(ret, fd));
    }
    line(
        "socket-vsock",
        match nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Vsock,
            nix::sys::socket::SockType::Stream,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            None,
        ) {
            Ok(_) => Outcome::Allowed,
            Err(e) => errno(e),
        },
    );
    let clone3 = sys::clone3_without_arguments();
    println!(
        "probe clone3: {}",
        match clone3 {
            Errno::ENOSYS => "absent (ENOSYS)".to_owned(),
            other => format!("present ({other:?})"),
        }
    );
    for addr in connects {
        let outcome = match addr.parse::<std::net::SocketAddr>() {
            Ok(sa) => match std::net::TcpStream::connect_timeout(&sa, Duration::from_secs(2)) {
                Ok(_) => Outcome::Allowed,
                Err(e) => Outcome::Refused(e.to_string()),
            },
            Err(e) => Outcome::Refused(format!("not an address: {e}")),
        };
        line(&format!("connect {addr}"), outcome);
    }
    std::process::ExitCode::SUCCESS
}

/// Runs `attempt` in a forked child and reports its outcome (the child exits
/// right after).
fn in_child(attempt: impl FnOnce() -> Result<(), Outcome>) -> Outcome {
    let (read, write) = match nix::unistd::pipe() {
        Ok(p) => p,
        Err(e) => return errno(e),
    };
    match sys::fork() {
        Err(e) => errno(e),
        Ok(None) => {
            drop(read);
            let message = match attempt() {
                Ok(()) => String::new(),
                Err(Outcome::Refused(why)) => why,
                Err(Outcome::Allowed) => String::new(),
            };
            let _ = nix::unistd::write(&write, message.as_bytes());
            sys::exit_now()
        }
        Ok(Some(child)) => {
            drop(write);
            let mut said = Vec::new();
            let mut buf = [0u8; 256];
            while let Ok(n) = nix::unistd::read(&read, &mut buf) {
                if n == 0 {
                    break;
                }
                said.extend_from_slice(&buf[..n]);
            }
            let _ = nix::sys::wait::waitpid(child, None);
            if said.is_empty() {
                Outcome::Allowed
            } else {
                Outcome::Refused(String::from_utf8_lossy(&said).into_owned())
            }
        }
    }
}

/// The raw system calls the probe makes. Every one is given arguments the kernel
/// only reads (zeroed attribute structs of the documented sizes on the stack) or
/// none at all; nothing the kernel writes back is used but the return value.
#[allow(unsafe_code)]
mod sys {
    use nix::errno::Errno;
    use nix::libc;

    /// `(name, return value, returns a descriptor)` of each attempt.
    pub fn attempts() -> Vec<(&'static str, i64, bool)> {
        const KEYCTL_GET_KEYRING_ID: libc::c_long = 0;
        const KEY_SPEC_SESSION_KEYRING: libc::c_long = -3;
        const KEY_SPEC_PROCESS_KEYRING: libc::c_long = -2;
        const BPF_MAP_CREATE: libc::c_long = 0;
        const UFFD_USER_MODE_ONLY: libc::c_long = 1;
        let mut out = Vec::new();
        // SAFETY: keyctl(GET_KEYRING_ID, session keyring, create = 0) takes only
        // integers.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_keyctl,
                KEYCTL_GET_KEYRING_ID,
                KEY_SPEC_SESSION_KEYRING,
                0,
            )
        };
        out.push(("keyctl", ret, false));
        let (kind, desc, payload) = (c"user", c"vm0-probe", b"x");
        // SAFETY: add_key reads two NUL-terminated strings and `payload.len()`
        // bytes from valid buffers that outlive the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_add_key,
                kind.as_ptr(),
                desc.as_ptr(),
                payload.as_ptr(),
                payload.len(),
                KEY_SPEC_PROCESS_KEYRING,
            )
        };
        out.push(("add_key", ret, false));
        // union bpf_attr for BPF_MAP_CREATE: map_type, key_size, value_size,
        // max_entries (u32 each); the rest zero.
        let mut attr = [0u32; 30];
        attr[..4].copy_from_slice(&[2 /* BPF_MAP_TYPE_ARRAY */, 4, 4, 1]);
        // SAFETY: the kernel reads `size_of_val(&attr)` bytes of a live array.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_CREATE,
                attr.as_ptr(),
                std::mem::size_of_val(&attr),
            )
        };
        out.push(("bpf", ret, true));
        // struct perf_event_attr (PERF_ATTR_SIZE_VER0 = 64 bytes): type
        // PERF_TYPE_SOFTWARE, size, config PERF_COUNT_SW_CPU_CLOCK, flags
        // disabled | exclude_kernel | exclude_hv (what an unprivileged user may ask).
        let mut perf = [0u64; 8];
        perf[0] = 1 | (64 << 32);
        perf[5] = 1 | (1 << 5) | (1 << 6);
        // SAFETY: the kernel reads the 64 bytes the size field names, of a live array.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_perf_event_open,
                perf.as_ptr(),
                0,
                -1,
                -1,
                8, // PERF_FLAG_FD_CLOEXEC
            )
        };
        out.push(("perf_event_open", ret, true));
        // SAFETY: userfaultfd takes only flags.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_userfaultfd,
                libc::O_CLOEXEC as libc::c_long | UFFD_USER_MODE_ONLY,
            )
        };
        out.push(("userfaultfd", ret, true));
        // struct io_uring_params is 120 bytes; the kernel writes its answer into
        // it, which lives until the call returns.
        let mut params = [0u8; 120];
        // SAFETY: a valid, writable 120-byte buffer for one entry.
        let ret = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1, params.as_mut_ptr()) };
        out.push(("io_uring", ret, true));
        out
    }

    /// `clone3(NULL, 0)`: EINVAL from a kernel that has it (the size is too small
    /// to start anything), ENOSYS where a filter hides it.
    pub fn clone3_without_arguments() -> Errno {
        // SAFETY: a null pointer with size 0 is refused by the kernel before it
        // reads anything; no process is created.
        let ret = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0) };
        if ret < 0 {
            Errno::last()
        } else {
            Errno::UnknownErrno
        }
    }

    /// `fork()`: `None` in the child.
    pub fn fork() -> Result<Option<nix::unistd::Pid>, Errno> {
        // SAFETY: the probe is single-threaded when it forks (it runs before any
        // runtime starts), so the child may run arbitrary code.
        match unsafe { nix::unistd::fork() }? {
            nix::unistd::ForkResult::Child => Ok(None),
            nix::unistd::ForkResult::Parent { child } => Ok(Some(child)),
        }
    }

    /// Ends the child at once (no destructors of the parent's state).
    pub fn exit_now() -> ! {
        // SAFETY: _exit is always safe to call; it does not return.
        unsafe { libc::_exit(0) }
    }
}
