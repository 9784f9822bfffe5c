//! How long the controller takes to bring N EpicExports (default 1,000) to steady state on the
//! in-process fake API server, how many API requests that costs per export, and the process's peak
//! memory (controller and fake server together).
//!
//! Each export is hourly and missed its last slot (an operator restarting at the top of the hour),
//! so each pass must read its references, start one run (a Job), and write its status once.
//! Steady state: every export has `Ready` and one active run, and no write happens for 2 s.
//!
//! `cargo bench --bench operator_scale [-- N]`

#[path = "../tests/support/fake_api.rs"]
mod fake_api;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use epic_export::operator::controller::Settings;
use epic_export::operator::{ControllerOptions, serve_controller};
use fake_api::FakeApi;
use jiff::Timestamp;
use serde_json::json;

const EXPORTS: &str = "apis/fhirexport.dev/v1alpha1/epicexports";

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(bench(n));
}

async fn bench(n: usize) {
    let fake = FakeApi::new();
    let two_hours_ago = Timestamp::from_second(Timestamp::now().as_second() - 7200).unwrap();
    for ns in 0..10 {
        let ns = format!("team-{ns}");
        fake.put(
            "api/v1/secrets",
            json!({"metadata": {"name": "epic-key", "namespace": ns}, "data": {"private.pem": "eA=="}}),
        );
        fake.put(
            "api/v1/configmaps",
            json!({"metadata": {"name": "roster", "namespace": ns}, "data": {"roster.csv": "patient_id\nx\n"}}),
        );
    }
    for i in 0..n {
        fake.put(
            EXPORTS,
            json!({
                "metadata": {"name": format!("export-{i:05}"), "namespace": format!("team-{}", i % 10)},
                "spec": {
                    "schedule": "0 * * * *",
                    "fhir": {"baseUrl": "https://fhir.example.org/api/FHIR/R4"},
                    "auth": {"clientId": "abc", "keySecretRef": {"name": "epic-key", "key": "private.pem"}},
                    "source": {"search": {"rosterRef": {"configMapName": "roster", "key": "roster.csv"}, "resources": [{"type": "Patient"}]}},
                    "output": {"volumeClaimName": "exports"},
                },
                "status": {"lastScheduleTime": two_hours_ago.to_string()},
            }),
        );
    }
    let before = fake.requests().len();
    let rss_before = proc_status("VmRSS");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let started = Instant::now();
    let operator = tokio::spawn(serve_controller(
        fake.client(),
        ControllerOptions {
            settings: Settings {
                image: "epic-export:bench".into(),
                namespace: None,
                identity: "bench".into(),
                rotation: Default::default(),
            },
            http_addr: None,
            leader_election: None,
            jwks: None,
        },
        async {
            let _ = stop_rx.await;
        },
    ));

    let settled = loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let done = fake
            .list(EXPORTS, None)
            .iter()
            .filter(|e| {
                let s = &e["status"];
                s["active"].as_array().is_some_and(|a| a.len() == 1)
                    && s["conditions"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
            .count();
        if done == n {
            break started.elapsed();
        }
        if started.elapsed() > Duration::from_secs(600) {
            panic!("only {done} of {n} exports settled in 10 minutes");
        }
    };
    // Then quiet: no writes for 2 s.
    let mut mark = fake.requests().len();
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let writes = fake.writes_since(mark);
        if writes.is_empty() {
            break;
        }
        mark = fake.requests().len();
    }
    let requests: Vec<_> = fake.requests().into_iter().skip(before).collect();
    let _ = stop_tx.send(());
    let _ = operator.await;

    let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
    for r in &requests {
        let resource = r
            .path
            .rsplit('/')
            .find(|s| {
                [
                    "epicexports",
                    "jobs",
                    "secrets",
                    "configmaps",
                    "events",
                    "pods",
                    "status",
                ]
                .contains(s)
            })
            .unwrap_or("other");
        *by_kind
            .entry(format!("{} {}", r.verb(), resource))
            .or_default() += 1;
    }
    let jobs = fake.list("apis/batch/v1/jobs", None).len();
    println!("exports: {n}, runs started: {jobs}");
    println!(
        "time to steady state: {:.2} s ({:.0} exports/s)",
        settled.as_secs_f64(),
        n as f64 / settled.as_secs_f64()
    );
    println!(
        "API requests: {} total, {:.2} per export",
        requests.len(),
        requests.len() as f64 / n as f64
    );
    for (kind, count) in by_kind {
        println!(
            "  {kind:<24} {count:>7}  ({:.2}/export)",
            count as f64 / n as f64
        );
    }
    println!(
        "RSS before the controller started (fake API server with the objects): {rss_before}; peak RSS with the controller: {}",
        proc_status("VmHWM")
    );
}

/// A memory figure of this process from /proc/self/status, e.g. "145412 kB".
fn proc_status(field: &str) -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
        })
        .unwrap_or_else(|| "unknown".into())
}
