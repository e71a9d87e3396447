//! srvlb: a Layer-4 TCP load balancer whose backends come from DNS SRV records.
//!
//! The library holds every piece of the balancer so that tests, benchmarks and the demo
//! drive the same code as the `srvlb` binary. ARCHITECTURE.md (at the repository root) has
//! the module map, the path of one connection, and the invariants the hot path keeps.

// splice, pipes and socket options go through rustix and socket2. The one exception is the
// io_uring ring (`proxy::uring::ring`), which hands the kernel pointers into its own memory:
// it alone allows unsafe code, and every block says why it is sound.
#![deny(unsafe_code)]

// The public API is what the `srvlb` binary, the demo (examples/demo/), the benches and
// the integration tests (tests/it) use, and no more: the configuration, the process
// (`control::run`, `Server`), a service and its pool, selection for the benches, discovery's
// lookups for `srvlb check --resolve`, the PROXY header codec. Inside these modules every
// other item is `pub(crate)` (ARCHITECTURE.md, "The public API"); the modules declared
// `pub(crate)` here are used by nothing outside.
pub mod access_log;
pub(crate) mod admin;
pub mod balance;
pub mod config;
pub mod control;
pub mod discovery;
pub mod fd_budget;
pub mod health;
pub(crate) mod log_throttle;
mod os_error;
pub mod pool;
pub mod proxy;
pub mod service;
pub(crate) mod source_limits;
pub(crate) mod workers;
