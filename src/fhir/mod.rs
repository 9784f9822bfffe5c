//! Talking to a FHIR R4 server: the authorised HTTP client with retries and rate limiting (`client`,
//! `ratelimit`) and search-bundle parsing (`bundle`). Clients, bounded reads and retry rules come from
//! `crate::http`; nothing here writes files.

pub mod bundle;
pub mod client;
pub mod ratelimit;

pub use client::{FetchError, FhirClient, Limits, Reply, RetryMode};
