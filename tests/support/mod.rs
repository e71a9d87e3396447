//! Helpers shared by the integration tests; each test binary includes this with
//! `mod support;` and uses what it needs.

pub mod bind;
