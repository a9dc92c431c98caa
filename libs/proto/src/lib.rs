//! Types generated from `proto/vm0/worker/v1/worker.proto`: the `ControlPlane`
//! gRPC service (client and server) and the `RunJob` message carried by JetStream.

#![allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub)]

/// `vm0.worker.v1`
pub mod worker {
    tonic::include_proto!("vm0.worker.v1");
}
