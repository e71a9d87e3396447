//! srvlb: a Layer-4 TCP load balancer whose backends come from DNS SRV records.
//!
//! The library holds every piece of the balancer so that tests, benchmarks and the demo
//! drive the same code as the `srvlb` binary. ARCHITECTURE.md (at the repository root) has
//! the module map, the path of one connection, and the invariants the hot path keeps.

// splice, pipes and socket options go through rustix and socket2; nothing here needs unsafe.
#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod balance;
pub mod config;
pub mod control;
pub mod discovery;
pub mod fd_budget;
pub mod health;
pub mod log_throttle;
pub mod pool;
pub mod proxy;
pub mod service;
pub mod source_limits;
pub mod workers;
