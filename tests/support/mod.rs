//! Shared test scaffolding: a sandbox with a registered client, and config files pointing at it.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use epic_export::auth::{Algorithm, SigningKey, keys};
use epic_export::sandbox::{
    ClientKeys, ClientRegistration, Dataset, SANDBOX_GROUP_ID, SEARCH_TYPES, Sandbox,
    SandboxOptions,
};
use serde_json::Value;

pub const CLIENT_ID: &str = "test-client";

pub struct Env {
    pub sandbox: Sandbox,
    pub dir: tempfile::TempDir,
    pub key: SigningKey,
}

/// Starts a sandbox, registers an ES384 key (fast to make) for `CLIENT_ID`, writes the key to disk.
pub async fn env(opts: SandboxOptions) -> Env {
    env_with_key(opts, Algorithm::ES384).await
}

pub async fn env_with_key(opts: SandboxOptions, alg: Algorithm) -> Env {
    let sandbox = Sandbox::start(opts).await.expect("sandbox starts");
    let key = SigningKey::generate(alg).unwrap();
    let jwks = serde_json::from_value(keys::jwks(std::slice::from_ref(&key))).unwrap();
    sandbox.register_client(ClientRegistration {
        client_id: CLIENT_ID.into(),
        keys: ClientKeys::Jwks(jwks),
    });
    let dir = tempfile::tempdir().unwrap();
    keys::write_key_pair(&key, &dir.path().join("keys")).unwrap();
    Env { sandbox, dir, key }
}

/// Every type the sandbox serves, Observation in three categories (the demo's list).
pub const ALL_SEARCHES: &str = epic_export::demo::DEMO_RESOURCES_CSV;

impl Env {
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes roster.csv (the given patients), resources.csv and config.yaml; `extra` is appended to the YAML.
    pub fn write_config(&self, patients: &[String], resources_csv: &str, extra: &str) -> PathBuf {
        let mut roster = String::from("patient_id,name\n");
        for p in patients {
            roster.push_str(&format!("{p},Somebody\n"));
        }
        std::fs::write(self.path().join("roster.csv"), roster).unwrap();
        std::fs::write(self.path().join("resources.csv"), resources_csv).unwrap();
        let yaml = format!(
            "name: test-export\nfhir:\n  baseUrl: {}\nauth:\n  clientId: {CLIENT_ID}\n  privateKeyFile: keys/private.pem\n\
             source:\n  search:\n    rosterFile: roster.csv\n    resourcesFile: resources.csv\n\
             output:\n  directory: out\n{extra}",
            self.sandbox.base_url()
        );
        let path = self.path().join("config.yaml");
        std::fs::write(&path, yaml).unwrap();
        path
    }

    pub fn export_dir(&self) -> PathBuf {
        self.path().join("out/test-export")
    }
}

/// Fast limits for tests.
pub const FAST_LIMITS: &str =
    "limits:\n  concurrency: 4\n  requestsPerSecond: 0\n  maxAttempts: 5\n";

/// The resources the sandbox holds for these patients and the ALL_SEARCHES list, by type and id.
pub fn expected(ds: &Dataset, patients: &[String]) -> BTreeMap<String, BTreeMap<String, Value>> {
    let categories: HashSet<&str> = ["laboratory", "vital-signs", "social-history"].into();
    let mut out: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
    for p in patients {
        for &t in std::iter::once(&"Patient").chain(SEARCH_TYPES) {
            for r in ds.resources(t, p) {
                if t == "Observation" {
                    let codes: Vec<&str> = r["category"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .flat_map(|c| c["coding"].as_array().into_iter().flatten())
                        .filter_map(|c| c["code"].as_str())
                        .collect();
                    if !codes.iter().any(|c| categories.contains(c)) {
                        continue;
                    }
                }
                let id = r["id"].as_str().unwrap().to_owned();
                out.entry(t.to_owned()).or_default().insert(id, r);
            }
        }
    }
    out
}

/// Reads `<run>/<Type>.ndjson` files into type → id → resource, failing on duplicates or bad lines.
pub fn read_run(run: &Path) -> BTreeMap<String, BTreeMap<String, Value>> {
    let mut out: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
    for entry in std::fs::read_dir(run).unwrap() {
        let path = entry.unwrap().path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        // The run log is not a resource file (the manifest does not list it).
        let Some(t) = name
            .strip_suffix(".ndjson")
            .filter(|_| name != "log.ndjson")
        else {
            continue;
        };
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.ends_with('\n'),
            "{name}: every line ends with a newline"
        );
        for line in text.lines() {
            let v: Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{name}: bad line: {e}"));
            assert_eq!(
                v["resourceType"], t,
                "{name}: resourceType matches the file"
            );
            let id = v["id"].as_str().unwrap().to_owned();
            assert!(
                out.entry(t.to_owned())
                    .or_default()
                    .insert(id.clone(), v)
                    .is_none(),
                "{name}: {id} written twice"
            );
        }
    }
    out
}

/// Asserts the run holds exactly the expected resources, content included.
pub fn assert_same_data(
    got: &BTreeMap<String, BTreeMap<String, Value>>,
    want: &BTreeMap<String, BTreeMap<String, Value>>,
) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "resource types"
    );
    for (t, resources) in want {
        let g = &got[t];
        assert_eq!(g.len(), resources.len(), "{t}: record count");
        for (id, r) in resources {
            assert_eq!(g.get(id), Some(r), "{t}/{id}: content");
        }
    }
}

/// Runs `epic-export run --config FILE --no-progress` as a separate process.
pub async fn run_binary(config: &Path) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_epic-export"))
        .args(["run", "--no-progress", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .output()
        .await
        .unwrap()
}

impl Env {
    /// Writes config.yaml for a bulk export; `bulk` is the YAML under `source.bulk` (indented 4).
    pub fn write_bulk_config(&self, bulk: &str, extra: &str) -> PathBuf {
        let yaml = format!(
            "name: test-export\nfhir:\n  baseUrl: {}\nauth:\n  clientId: {CLIENT_ID}\n  privateKeyFile: keys/private.pem\n\
             source:\n  bulk:\n{bulk}\
             output:\n  directory: out\n{extra}",
            self.sandbox.base_url()
        );
        let path = self.path().join("config.yaml");
        std::fs::write(&path, yaml).unwrap();
        path
    }
}

/// Every resource of every type the sandbox holds for these patients, by type and id.
pub fn expected_all(
    ds: &Dataset,
    patients: &[String],
) -> BTreeMap<String, BTreeMap<String, Value>> {
    let mut out: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
    for p in patients {
        for &t in std::iter::once(&"Patient").chain(SEARCH_TYPES) {
            for r in ds.resources(t, p) {
                let id = r["id"].as_str().unwrap().to_owned();
                out.entry(t.to_owned()).or_default().insert(id, r);
            }
        }
    }
    out
}

/// The client the exporter uses for FHIR and token requests (same-origin redirects only).
pub fn http_client(timeout: std::time::Duration) -> reqwest::Client {
    use epic_export::http::{Redirects, Timeout, client};
    client(Timeout::Total(timeout), Redirects::SameOrigin)
}

/// `source.bulk` for the sandbox's Group (the YAML under `source.bulk`, indented 4).
pub fn group_block() -> String {
    format!("    group: {SANDBOX_GROUP_ID}\n")
}

/// Bulk exports that are ready in 300 ms, without the kick-off throttle.
pub fn quick(opts: SandboxOptions) -> SandboxOptions {
    SandboxOptions {
        bulk_delay: std::time::Duration::from_millis(300),
        bulk_throttle: std::time::Duration::ZERO,
        ..opts
    }
}

/// Loads the config and runs the export in this process.
pub async fn run_config(config: &Path) -> epic_export::export::RunReport {
    let plan = epic_export::config::load_plan(config).unwrap();
    epic_export::export::run(&plan, &epic_export::export::RunOptions::default())
        .await
        .unwrap()
}

/// Reads `<run>/log.ndjson` and checks every line against the schema docs/src/output.md documents
/// (fields, types, values), and that no line holds one of `forbidden` (patient ids) or anything
/// like a token. Returns the lines.
pub fn check_run_log(run: &Path, forbidden: &[String]) -> Vec<Value> {
    let path = run.join("log.ndjson");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(text.ends_with('\n'), "log.ndjson ends with a newline");
    const REQUIRED: [&str; 9] = [
        "time",
        "event",
        "method",
        "path",
        "status",
        "bytes",
        "ms",
        "attempts",
        "correlation",
    ];
    const EVENTS: [&str; 7] = [
        "token",
        "page",
        "hydrate",
        "kickoff",
        "status",
        "download",
        "attachment",
    ];
    let mut lines = Vec::new();
    for line in text.lines() {
        for p in forbidden {
            assert!(
                !line.contains(p.as_str()),
                "patient id {p} in the log: {line}"
            );
        }
        for t in ["Bearer", "bearer", "eyJ", "access_token"] {
            assert!(!line.contains(t), "{t} in the log: {line}");
        }
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let o = v.as_object().expect("a line is an object");
        for k in REQUIRED {
            assert!(o.contains_key(k), "{k} missing: {line}");
        }
        for k in o.keys() {
            assert!(
                REQUIRED.contains(&k.as_str()) || ["progress", "error"].contains(&k.as_str()),
                "undocumented field {k}: {line}"
            );
        }
        let time = v["time"].as_str().expect("time is a string");
        assert!(
            time.parse::<jiff::Timestamp>().is_ok() && time.ends_with('Z'),
            "time is RFC 3339 UTC: {line}"
        );
        assert!(EVENTS.contains(&v["event"].as_str().unwrap()), "{line}");
        assert!(
            ["GET", "POST"].contains(&v["method"].as_str().unwrap()),
            "{line}"
        );
        assert!(v["path"].as_str().unwrap().starts_with('/'), "{line}");
        assert!(
            v["status"].is_null()
                || v["status"]
                    .as_u64()
                    .is_some_and(|s| (100..600).contains(&s)),
            "{line}"
        );
        assert!(v["bytes"].is_null() || v["bytes"].is_u64(), "{line}");
        assert!(v["ms"].is_u64(), "{line}");
        assert!(v["attempts"].as_u64().is_some_and(|a| a >= 1), "{line}");
        for (k, c) in v["correlation"]
            .as_object()
            .expect("correlation is an object")
        {
            let c = c.as_str().expect("correlation values are strings");
            assert!(
                k.starts_with("x-") && k.to_ascii_lowercase() == *k,
                "{line}"
            );
            assert!(
                !c.is_empty() && c.len() <= 128 && c.bytes().all(|b| (0x20..0x7f).contains(&b)),
                "{line}"
            );
        }
        if let Some(p) = o.get("progress") {
            assert!(p.is_string(), "{line}");
        }
        if let Some(e) = o.get("error") {
            assert!(e.is_string(), "{line}");
        }
        lines.push(v);
    }
    lines
}
