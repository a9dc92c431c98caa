//! The seccomp policy every run's command lives under, whatever the backend:
//! bubblewrap loads it into the whole sandbox (`bwrap --add-seccomp-fd`), and the
//! guest agent of a microVM applies it to the command it starts.
//!
//! The model is Docker's default profile for a container without capabilities:
//! everything is allowed but what gives an unprivileged process a way into the
//! kernel's less travelled code or out of its namespaces. Refused with `EPERM`:
//! new namespaces (`unshare`, `setns`, `clone` with a `CLONE_NEW*` flag), mounts
//! (old and new mount API, `pivot_root`, `chroot`), keyrings (`keyctl`, `add_key`,
//! `request_key`), `bpf`, `perf_event_open`, `userfaultfd`, `io_uring`, kernel
//! modules, `kexec`, `reboot`, swap, clocks, quotas, `acct`, `syslog`,
//! `open_by_handle_at`, port I/O, and `AF_VSOCK` sockets (vsock is not
//! namespaced: it would reach the host's and other VMs' services). `clone3` answers
//! `ENOSYS`, so that C libraries fall back to `clone`, whose flags a filter can see.
//! `ptrace` stays allowed: a run's pid namespace holds only its own processes, and
//! each run has its own uid.
//!
//! What the filter does not do: it is no substitute for the namespaces, uids and
//! cgroups around it, and it does not limit resources.
//!
//! Two programs, because a seccomp program has one action for what matches:
//! [`Programs::refuse`] (`EPERM`) and [`Programs::absent`] (`ENOSYS`). The kernel
//! runs every program installed and takes the strictest answer. Any architecture
//! but the one the programs are built for (x86-64) is killed: 32-bit syscalls
//! (`int 0x80`) would otherwise pass under other numbers. x32 numbers of the
//! refused calls are refused too.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("the seccomp policy has no syscall table for {0}")]
    UnsupportedArch(&'static str),
    #[error("building the seccomp filter failed: {0}")]
    Build(String),
    #[error("installing the seccomp filter failed: {0}")]
    Apply(String),
}

/// x86-64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl).
#[cfg(target_arch = "x86_64")]
mod nr {
    pub const CLONE: i64 = 56;
    pub const SOCKET: i64 = 41;
    pub const UNSHARE: i64 = 272;
    pub const CLONE3: i64 = 435;
    /// x32 syscalls are the x86-64 numbers with this bit set, under the same
    /// audit architecture.
    pub const X32_BIT: i64 = 0x4000_0000;

    /// Refused whatever their arguments, with the name docs and probes show.
    pub const REFUSED: &[(&str, i64)] = &[
        ("syslog", 103),
        ("uselib", 134),
        ("vhangup", 153),
        ("pivot_root", 155),
        ("_sysctl", 156),
        ("adjtimex", 159),
        ("chroot", 161),
        ("acct", 163),
        ("settimeofday", 164),
        ("mount", 165),
        ("umount2", 166),
        ("swapon", 167),
        ("swapoff", 168),
        ("reboot", 169),
        ("iopl", 172),
        ("ioperm", 173),
        ("init_module", 175),
        ("delete_module", 176),
        ("quotactl", 179),
        ("nfsservctl", 180),
        ("lookup_dcookie", 212),
        ("clock_settime", 227),
        ("kexec_load", 246),
        ("add_key", 248),
        ("request_key", 249),
        ("keyctl", 250),
        ("perf_event_open", 298),
        ("open_by_handle_at", 304),
        ("clock_adjtime", 305),
        ("setns", 308),
        ("finit_module", 313),
        ("kexec_file_load", 320),
        ("bpf", 321),
        ("userfaultfd", 323),
        ("io_uring_setup", 425),
        ("io_uring_enter", 426),
        ("io_uring_register", 427),
        ("open_tree", 428),
        ("move_mount", 429),
        ("fsopen", 430),
        ("fsconfig", 431),
        ("fsmount", 432),
        ("fspick", 433),
        ("mount_setattr", 442),
        ("quotactl_fd", 443),
    ];
}

/// Every `CLONE_NEW*` flag: a `clone` or `unshare` with any of them is refused.
const NAMESPACE_FLAGS: &[u64] = &[
    0x0000_0080, // CLONE_NEWTIME
    0x0002_0000, // CLONE_NEWNS
    0x0200_0000, // CLONE_NEWCGROUP
    0x0400_0000, // CLONE_NEWUTS
    0x0800_0000, // CLONE_NEWIPC
    0x1000_0000, // CLONE_NEWUSER
    0x2000_0000, // CLONE_NEWPID
    0x4000_0000, // CLONE_NEWNET
];
const AF_VSOCK: u64 = 40;
const EPERM: u32 = 1;
const ENOSYS: u32 = 38;

/// The names of the calls refused whatever their arguments, for documents and
/// reports; `clone`/`unshare` with namespace flags and `AF_VSOCK` sockets are
/// refused too, and `clone3` is absent.
pub fn refused_calls() -> Vec<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        nr::REFUSED.iter().map(|(name, _)| *name).collect()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Vec::new()
    }
}

/// The policy's two BPF programs.
#[derive(Debug, Clone)]
pub struct Programs {
    /// Refused calls answer `EPERM`.
    pub refuse: BpfProgram,
    /// `clone3` answers `ENOSYS`.
    pub absent: BpfProgram,
}

fn any_flag(arg: u8, flags: &[u64]) -> Result<Vec<SeccompRule>, PolicyError> {
    flags
        .iter()
        .map(|flag| {
            let cond = SeccompCondition::new(
                arg,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(*flag),
                *flag,
            )
            .map_err(|e| PolicyError::Build(e.to_string()))?;
            SeccompRule::new(vec![cond]).map_err(|e| PolicyError::Build(e.to_string()))
        })
        .collect()
}

fn equals(arg: u8, value: u64) -> Result<Vec<SeccompRule>, PolicyError> {
    let cond = SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
        .map_err(|e| PolicyError::Build(e.to_string()))?;
    Ok(vec![
        SeccompRule::new(vec![cond]).map_err(|e| PolicyError::Build(e.to_string()))?,
    ])
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    on_match: SeccompAction,
) -> Result<BpfProgram, PolicyError> {
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, on_match, TargetArch::x86_64)
        .map_err(|e| PolicyError::Build(e.to_string()))?;
    BpfProgram::try_from(filter).map_err(|e| PolicyError::Build(e.to_string()))
}

impl Programs {
    /// Compiles the policy for this machine's architecture.
    pub fn build() -> Result<Programs, PolicyError> {
        #[cfg(not(target_arch = "x86_64"))]
        {
            Err(PolicyError::UnsupportedArch(std::env::consts::ARCH))
        }
        #[cfg(target_arch = "x86_64")]
        {
            let mut refuse = BTreeMap::new();
            for base in [0, nr::X32_BIT] {
                for (_, n) in nr::REFUSED {
                    refuse.insert(base | n, Vec::new());
                }
                refuse.insert(base | nr::CLONE, any_flag(0, NAMESPACE_FLAGS)?);
                refuse.insert(base | nr::UNSHARE, any_flag(0, NAMESPACE_FLAGS)?);
                refuse.insert(base | nr::SOCKET, equals(0, AF_VSOCK)?);
            }
            let absent = BTreeMap::from([
                (nr::CLONE3, Vec::new()),
                (nr::X32_BIT | nr::CLONE3, Vec::new()),
            ]);
            Ok(Programs {
                refuse: compile(refuse, SeccompAction::Errno(EPERM))?,
                absent: compile(absent, SeccompAction::Errno(ENOSYS))?,
            })
        }
    }

    /// Both programs, as the bytes `bwrap --add-seccomp-fd` reads.
    pub fn as_bytes(&self) -> [Vec<u8>; 2] {
        [to_bytes(&self.refuse), to_bytes(&self.absent)]
    }

    /// Installs both programs on the calling thread (with `no_new_privs`); what
    /// it starts afterwards inherits them. Other threads are untouched.
    pub fn apply_to_this_thread(&self) -> Result<(), PolicyError> {
        for program in [&self.refuse, &self.absent] {
            seccompiler::apply_filter(program).map_err(|e| PolicyError::Apply(e.to_string()))?;
        }
        Ok(())
    }
}

/// A program as the kernel's `struct sock_filter` array: per instruction a
/// 16-bit code, 8-bit jump offsets and a 32-bit constant, in native byte order.
pub fn to_bytes(program: &BpfProgram) -> Vec<u8> {
    let mut out = Vec::with_capacity(program.len() * 8);
    for insn in program {
        out.extend_from_slice(&insn.code.to_ne_bytes());
        out.push(insn.jt);
        out.push(insn.jf);
        out.extend_from_slice(&insn.k.to_ne_bytes());
    }
    out
}

/// Whether the calling thread already runs under a seccomp filter (then the
/// policy was installed by whoever started it: bubblewrap).
pub fn already_filtered() -> bool {
    std::fs::read_to_string("/proc/thread-self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Seccomp:").map(|v| v.trim() == "2"))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_programs_compile_to_whole_instructions() {
        let p = Programs::build().expect("policy");
        let [refuse, absent] = p.as_bytes();
        assert_eq!(refuse.len() % 8, 0);
        assert_eq!(absent.len() % 8, 0);
        // Arch check, then per refused call at least a compare and a return.
        assert!(refuse.len() / 8 > 2 * nr::REFUSED.len(), "{}", refuse.len());
        assert!(refused_calls().contains(&"keyctl"));
    }

    /// The policy on a thread of its own: the refused calls fail with EPERM, and
    /// what is allowed still works.
    #[test]
    fn a_filtered_thread_is_refused_what_the_policy_names() {
        let p = Programs::build().expect("policy");
        let outcome = std::thread::spawn(move || {
            p.apply_to_this_thread().expect("apply");
            let status = std::process::Command::new("unshare")
                .args(["-U", "true"])
                .status()
                .map(|s| s.success());
            let echo = std::process::Command::new("sh")
                .args(["-c", "echo ok"])
                .output()
                .map(|o| o.stdout);
            (status, echo, already_filtered())
        })
        .join()
        .expect("thread");
        assert_eq!(outcome.0.ok(), Some(false), "unshare -U refused");
        assert_eq!(outcome.1.ok().as_deref(), Some(&b"ok\n"[..]));
        assert!(outcome.2, "the thread reports its filter");
        assert!(!already_filtered(), "other threads are not filtered");
    }
}
