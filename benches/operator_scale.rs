//! Operator scale: how long the real `epic-export controller` (a separate process, so its memory is
//! its own) takes to bring N EpicExports (default 1,000) to steady state on the fake API server (served
//! over HTTP by this bench), how many API requests that costs per export, its peak memory, and how many
//! writes it makes per minute once idle.
//!
//! Each export is hourly and missed its last slot (an operator restarting at the top of the hour),
//! so each pass must read its references, start one run (a Job), and write its status once.
//! Steady state: every export has `Ready` and one active run, and no write happens for 2 s.
//!
//! `cargo bench --bench operator_scale [-- N [IDLE_SECONDS]]`   (defaults: 1000 60)

#[path = "../tests/support/fake_api.rs"]
mod fake_api;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fake_api::FakeApi;
use jiff::Timestamp;
use serde_json::json;

const EXPORTS: &str = "apis/fhirexport.dev/v1alpha1/epicexports";

fn main() {
    let numbers: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let n = numbers.first().copied().unwrap_or(1000) as usize;
    let idle = numbers.get(1).copied().unwrap_or(60);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(bench(n, Duration::from_secs(idle)));
}

async fn bench(n: usize, idle: Duration) {
    let fake = FakeApi::new();
    let two_hours_ago = Timestamp::from_second(Timestamp::now().as_second() - 7200).unwrap();
    // A real key: the controller derives each export's public keys from it (status.publicKeys).
    let key =
        epic_export::auth::keys::SigningKey::generate(epic_export::auth::keys::Algorithm::ES384)
            .expect("a key");
    let pem = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(key.to_pkcs8_pem().expect("PEM"))
    };
    for ns in 0..10 {
        let ns = format!("team-{ns}");
        fake.put(
            "api/v1/secrets",
            json!({"metadata": {"name": "epic-key", "namespace": ns}, "data": {"private.pem": pem}}),
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
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = format!("http://{}", listener.local_addr().unwrap());
    let server = {
        let fake = fake.clone();
        tokio::spawn(async move { fake.serve_http(listener).await })
    };
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"{api}\"}}\nusers:\n- name: bench\n  user: {{token: bench}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: bench}}\ncurrent-context: fake\n"
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("controller.log")).unwrap();

    let before = fake.requests().len();
    let started = Instant::now();
    let mut controller = Command::new(env!("CARGO_BIN_EXE_epic-export"))
        .args([
            "controller",
            "--image",
            "epic-export:bench",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start epic-export controller");
    let pid = controller.id();

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
    let steady = started.elapsed();
    let rss_settled = proc_status(pid, "VmRSS");

    // Idle: no export is due until the next hour; count every write.
    let mark = fake.requests().len();
    tokio::time::sleep(idle).await;
    let idle_writes = fake.writes_since(mark).len();
    let peak = proc_status(pid, "VmHWM");
    let _ = controller.kill();
    let _ = controller.wait();
    server.abort();

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
    let per_minute = idle_writes as f64 * 60.0 / idle.as_secs_f64();
    let mib = |kb: u64| kb as f64 / 1024.0;
    println!("exports: {n}, runs started: {jobs}");
    println!(
        "time to steady state: {:.2} s ({:.0} exports/s; all Ready with their run started after {:.2} s, then 2 s without a write)",
        settled.as_secs_f64(),
        n as f64 / settled.as_secs_f64(),
        settled.as_secs_f64(),
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
        "controller process memory: {:.1} MiB at steady state ({:.1} s), peak {:.1} MiB",
        mib(rss_settled),
        steady.as_secs_f64(),
        mib(peak)
    );
    println!(
        "idle: {idle_writes} writes in {} s ({per_minute:.1} per minute)",
        idle.as_secs()
    );
    // One line for benches/run.sh.
    println!(
        "RESULT operator exports={n} steady_s={:.2} peak_rss_mib={:.1} requests_per_export={:.2} idle_writes_per_min={per_minute:.1}",
        settled.as_secs_f64(),
        mib(peak),
        requests.len() as f64 / n as f64
    );
}

/// A memory figure (kB) of process `pid` from /proc/PID/status, e.g. `VmHWM` (peak RSS).
fn proc_status(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
