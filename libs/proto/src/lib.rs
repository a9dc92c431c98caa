//! Types generated from `proto/`: the worker ↔ control plane gRPC service and
//! `RunJob` (`worker`), the host ↔ guest agent messages (`guest`), and the framing
//! of the guest byte stream (`frame`).

/// Length-prefixed framing of the guest protocol, with bounded frame sizes.
pub mod frame;

/// `vm0.worker.v1`
#[allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub)]
pub mod worker {
    tonic::include_proto!("vm0.worker.v1");
}

/// `vm0.guest.v1`
#[allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub)]
pub mod guest {
    tonic::include_proto!("vm0.guest.v1");

    /// The run user: commands run as this uid and gid unless `Start.as_root`, and
    /// `/work` and the files the host writes belong to it. Numeric: no passwd entry
    /// is needed in the guest.
    pub const RUN_UID: u32 = 1000;
    pub const RUN_GID: u32 = 1000;
    /// Processes a run may have at once, in every backend (a fork bomb ends here,
    /// not in the host's process table): the pids cgroup of a bubblewrap run, and
    /// the command's `RLIMIT_NPROC` everywhere.
    pub const RUN_PROCESSES_MAX: u64 = 4096;
}
