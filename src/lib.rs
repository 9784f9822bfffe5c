//! epic-export
