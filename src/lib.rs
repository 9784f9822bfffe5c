//! epic-export: export patient data from Epic (and any SMART Backend Services FHIR R4 server) to NDJSON.
//!
//! Flow: a front end (`config`) validates into an `ExportPlan` (`plan`); `export` authenticates (`auth`),
//! retrieves over HTTP (`fhir`), streams into a run folder (`output`) and reports a `RunSummary`
//! (`summary`). `sandbox` is the built-in Epic-compatible server that `demo`, the tests and the
//! benchmarks run against. `cli` is the command line. `schedule` decides when scheduled runs are due
//! (cron in a time zone, Kubernetes CronJob semantics; pure); `scheduler` is the standalone
//! `epic-export schedule` loop built on it. `operator` is the Kubernetes side (CRD, Jobs, controller,
//! JWK Set endpoint); `keygen` makes keys and their Secret manifests.

pub mod auth;
pub mod check;
pub mod cli;
pub mod config;
pub mod demo;
pub mod export;
pub mod fhir;
pub mod http;
pub mod keygen;
pub mod logging;
pub mod notify;
pub mod operator;
pub mod output;
pub mod plan;
pub mod progress;
pub mod run;
pub mod sandbox;
pub mod schedule;
pub mod scheduler;
pub mod storage;
pub mod summary;
pub mod task;
pub mod text;
pub mod trust;
