//! Helpers shared by the integration test modules: the spawned binary and test backends
//! (`harness`), an in-process authoritative DNS server (`dns`), a real bind9 `named`
//! (`bind`), and unbound and dnsmasq (`resolvers`).

pub mod bind;
pub mod dns;
pub mod harness;
pub mod resolvers;
