//! End-to-end: runs dispatched over a real nats-server to real worker processes,
//! executed in bubblewrap sandboxes, watched through the gateway's API.

mod harness;

mod claims;
mod fleet;
mod hostile;
mod lifecycle;
mod microvm;
mod network;
mod persister;
mod prometheus;
mod reliability;
mod retention;
mod storage;
mod traces;
mod trust;
