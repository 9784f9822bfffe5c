//! Talking to a FHIR R4 server: the authorised HTTP client with retries and rate limiting (`client`,
//! `ratelimit`), search-bundle parsing (`bundle`), references (`reference`) and editing a resource
//! without re-encoding it (`raw`). Clients, bounded reads and retry rules come from
//! `crate::http`; nothing here writes files.

pub mod bundle;
pub mod client;
pub mod ndjson;
pub mod ratelimit;
pub mod raw;
pub mod reference;
pub mod runlog;

pub use client::{FetchError, FhirClient, Limits, Reply, RetryMode};
