//! End-to-end tests of the REST API: a gateway on a real socket, over SQLite and a
//! real PostgreSQL server, driven by a real HTTP client.

mod common;

mod agents;
mod auth;
mod doc_examples;
mod events;
mod http;
mod pagination;
mod runs;
mod storage;
mod tenancy;
mod token_trust;
