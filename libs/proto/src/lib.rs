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
}
