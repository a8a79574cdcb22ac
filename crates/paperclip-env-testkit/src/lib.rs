//! testkit
pub mod fake;
