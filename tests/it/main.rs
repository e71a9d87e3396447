//! srvlb's integration tests: the real binary or the real library against real sockets on
//! 127.0.0.1, an in-process DNS server, and real DNS software from Debian (bind9, unbound, dnsmasq). One test
//! crate with a module per area, so the suite compiles and links once instead of once per
//! file (a test binary per file linked the whole dependency graph nine times on CI's two
//! cores). ARCHITECTURE.md says which behaviour each area guards.
//!
//! Run one area with a filter on its module path, e.g. `cargo test --test it faults::`.

mod support;

mod accept_proxy;
mod access_log;
mod admin;
mod admin_http;
mod bind_e2e;
mod bind_harness;
mod data_path;
mod discovery;
mod dns_server;
mod e2e;
mod faults;
mod properties;
mod reload;
mod resolvers_e2e;
mod soak;
mod source_limits;
