//! Helpers shared by the integration tests. Each test binary includes this with
//! `mod support;` and uses only the modules it needs.

pub mod bind;
pub mod dns;
pub mod harness;
pub mod resolvers;
