//! Helpers shared by the integration test modules: the spawned binary and test backends
//! (`harness`), an in-process authoritative DNS server (`dns`), and a real bind9 `named`
//! (`bind`).

pub mod bind;
pub mod dns;
pub mod harness;
