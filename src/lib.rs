//! epic-export
pub mod sandbox;
