//! A run's network egress. `policy` (always built): an agent's `network`
//! config, parsed and matched, and `refused`, what no policy reaches. With the
//! `proxy` feature (the worker): the run's network namespace (`netns`) and the
//! worker's transparent proxy (`proxy`) that enforces the policy and logs every
//! connection attempt, and `intercept`, its TLS termination for `secretHeaders`.
//! `sniff` and `dns` read what crosses it.

pub mod dns;
pub mod policy;
pub mod refused;
pub mod sniff;

#[cfg(feature = "proxy")]
pub mod intercept;
#[cfg(feature = "proxy")]
pub mod netns;
#[cfg(feature = "proxy")]
pub mod proxy;

#[cfg(feature = "proxy")]
pub use netns::Link;
#[cfg(feature = "proxy")]
pub use proxy::{Egress, EgressConfig, NetworkLog, RunEgress};

#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    /// This host cannot give runs a network (not root, tools missing).
    #[error("run networking is unavailable: {0}")]
    Unavailable(String),
    /// A run's namespace could not be made.
    #[error("setting up the run's network failed: {0}")]
    Setup(String),
}
