//! Runs published to object storage (`output.url`), end to end: the binary runs against the sandbox
//! with credentials from the environment only, and writes to a real store process (S3: moto, Azure
//! Blob: Azurite, GCS: object_store's client against moto's XML API). Each run is compared with a
//! local run of the same export: the same files, byte for byte, the same checksums and the same
//! manifest. Also: `latest.json` names a run whose manifest lists every object; a run killed
//! mid-upload leaves no visible run and the next one succeeds and removes its objects; retention;
//! refused credentials stop the run before anything is fetched, without the secret in the message.
//! Needs `eval "$(scripts/stores.sh)"` (scripts/test.sh does it).

#[path = "support/stores.rs"]
mod stores;
mod support;

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use epic_export::sandbox::SandboxOptions;
use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use serde_json::Value;
use stores::{AzureServer, GcsServer, S3Server};
use support::*;

const PREFIX: &str = "exports/epic";
const HYDRATE: &str =
    "hydrate: [Medication, Practitioner, PractitionerRole, Organization, Location]\n";

/// A store under test: its server (kept alive), credentials and client.
struct Target {
    env: Vec<(String, String)>,
    url: String,
    store: Arc<dyn ObjectStore>,
    _server: Box<dyn std::any::Any + Send>,
}

async fn s3() -> Target {
    let s = S3Server::start().await;
    Target {
        env: s.env(),
        url: s.url(PREFIX),
        store: s.store(),
        _server: Box::new(s),
    }
}

async fn azure() -> Target {
    let s = AzureServer::start().await;
    Target {
        env: s.env(),
        url: s.url(PREFIX),
        store: s.store(),
        _server: Box::new(s),
    }
}

async fn gcs() -> Target {
    let s = GcsServer::start().await;
    Target {
        env: s.env(),
        url: s.url(PREFIX),
        store: s.store(),
        _server: Box::new(s),
    }
}

/// `epic-export run` as a child process with `env` added (and nothing else of the cloud's).
fn command(config: &Path, env: &[(String, String)]) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_epic-export"));
    c.args(["run", "--no-progress", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .envs(env.iter().cloned())
        .kill_on_drop(true);
    c
}

async fn run_with(config: &Path, env: &[(String, String)]) -> std::process::Output {
    command(config, env).output().await.unwrap()
}

fn text(out: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every object under `prefix`, by path relative to it.
async fn objects(store: &Arc<dyn ObjectStore>, prefix: &str) -> BTreeMap<String, Vec<u8>> {
    let prefix = ObjectPath::from(prefix);
    let listed: Vec<_> = store.list(Some(&prefix)).try_collect().await.unwrap();
    let mut out = BTreeMap::new();
    for meta in listed {
        let bytes = store
            .get(&meta.location)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let relative = meta.location.as_ref()[prefix.as_ref().len() + 1..].to_owned();
        out.insert(relative, bytes.to_vec());
    }
    out
}

/// Every file under `dir`, by relative path.
fn files_of(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let relative = path.strip_prefix(root).unwrap().display().to_string();
                out.insert(relative, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap()
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut plain = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut plain)
        .unwrap();
    plain
}

/// The parts of a manifest that describe the data (not when or how it was requested). A file's
/// `sha256` is left out: searches that run at once may append their pages in another order from one
/// run to the next (each run's `sha256` is checked against its own file).
fn manifest_data(m: &Value) -> Value {
    let mut m = m.clone();
    for list in ["output", "error", "deleted"] {
        for entry in m[list].as_array_mut().into_iter().flatten() {
            entry.as_object_mut().unwrap().remove("sha256");
        }
    }
    serde_json::json!({
        "output": m["output"],
        "error": m["error"],
        "deleted": m["deleted"],
        "attachments": m["attachments"],
    })
}

/// Whether two files hold the same content: documents byte for byte, NDJSON the same lines in
/// any order (see `manifest_data`).
fn same_content(name: &str, a: &[u8], b: &[u8]) -> bool {
    if !name.ends_with(".ndjson") {
        return a == b;
    }
    let lines = |x: &[u8]| {
        let mut l: Vec<Vec<u8>> = x.split(|&c| c == b'\n').map(<[u8]>::to_vec).collect();
        l.sort();
        l
    };
    lines(a) == lines(b)
}

/// The latest run in the store: its id and objects (relative to the run).
async fn latest_run(t: &Target) -> (String, BTreeMap<String, Vec<u8>>) {
    let latest_path = ObjectPath::from(format!("{PREFIX}/test-export/latest.json"));
    let latest = json(
        &t.store
            .get(&latest_path)
            .await
            .expect("latest.json is written")
            .bytes()
            .await
            .unwrap(),
    );
    let run_id = latest["runId"].as_str().unwrap().to_owned();
    assert_eq!(
        latest["manifest"],
        format!("{PREFIX}/test-export/{run_id}/manifest.json")
    );
    let run = objects(&t.store, &format!("{PREFIX}/test-export/{run_id}")).await;
    (run_id, run)
}

/// The config with `output.url` in place of the local folder (which stays the working folder).
fn to_store(config: &Path, url: &str, extra: &str) {
    let text = std::fs::read_to_string(config).unwrap();
    let text = text.replace(
        "output:\n  directory: out\n",
        &format!("output:\n  directory: work\n  url: {url}\n{extra}"),
    );
    std::fs::write(config, text).unwrap();
}

/// One search export (attachments and hydration on, so files are rewritten and documents uploaded)
/// and one bulk export (gzip) to `t`, each compared with the same export run to a local folder.
async fn same_as_local(t: Target) {
    let env = env(quick(SandboxOptions::default())).await;
    let patients: Vec<String> = env.sandbox.dataset().patient_ids()[..6].to_vec();
    let settings = format!(
        "limits:\n  concurrency: 1\n  requestsPerSecond: 0\n  maxAttempts: 5\nattachments:\n  enabled: true\n{HYDRATE}"
    );

    let config = env.write_config(&patients, ALL_SEARCHES, &settings);
    let local = run_config(&config).await;
    assert!(local.summary.records_total > 0);
    let local = files_of(&local.dir);
    to_store(&config, &t.url, "");
    let out = run_with(&config, &t.env).await;
    assert!(out.status.success(), "{}", text(&out));
    let (run_id, remote) = latest_run(&t).await;

    let names = |m: &BTreeMap<String, Vec<u8>>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&remote), names(&local), "the same files");
    assert!(
        remote.keys().any(|k| k.starts_with("attachments/")),
        "documents were uploaded"
    );
    // The run log is uploaded too (its times differ from the local run's).
    assert!(
        remote.contains_key("log.ndjson"),
        "the run log was uploaded"
    );
    for (name, bytes) in &local {
        if name == "manifest.json" || name == "summary.json" || name == "log.ndjson" {
            continue;
        }
        assert!(
            same_content(name, &remote[name], bytes),
            "{name}: the same content as the local run"
        );
    }
    let manifest = json(&remote["manifest.json"]);
    assert_eq!(
        manifest_data(&manifest),
        manifest_data(&json(&local["manifest.json"])),
        "the same manifest"
    );
    for entry in manifest["output"].as_array().unwrap() {
        let name = entry["url"].as_str().unwrap();
        let sha = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &remote[name]);
        assert_eq!(
            entry["sha256"],
            epic_export::text::hex(sha.as_ref()),
            "{name}"
        );
    }
    let summary = json(&remote["summary.json"]);
    assert_eq!(summary["outcome"], "success");
    assert_eq!(summary["runId"], run_id.as_str());
    assert_eq!(
        summary["outputDir"],
        format!("{}/test-export/{run_id}/", t.url),
        "the summary names the run's URL"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("{}/test-export/{run_id}/", t.url)),
        "{stdout}"
    );
    // Nothing of the run stays in the working folder.
    let work = env.path().join("work/test-export");
    let left: Vec<String> = std::fs::read_dir(&work)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with(".lock"))
        .collect();
    assert!(left.is_empty(), "left in the working folder: {left:?}");

    // Bulk, gzip-compressed: the same NDJSON as a local bulk run, and the manifest's checksums are
    // those of the NDJSON.
    let config = env.write_bulk_config(&group_block(), FAST_LIMITS);
    let local = run_config(&config).await;
    let local = files_of(&local.dir);
    to_store(&config, &t.url, "  compression: gzip\n");
    let out = run_with(&config, &t.env).await;
    assert!(out.status.success(), "{}", text(&out));
    let (bulk_id, remote) = latest_run(&t).await;
    assert_ne!(bulk_id, run_id);
    let manifest = json(&remote["manifest.json"]);
    let local_manifest = json(&local["manifest.json"]);
    let outputs = manifest["output"].as_array().unwrap();
    assert_eq!(
        outputs.len(),
        local_manifest["output"].as_array().unwrap().len()
    );
    for (entry, local_entry) in outputs
        .iter()
        .zip(local_manifest["output"].as_array().unwrap())
    {
        let name = entry["url"].as_str().unwrap();
        let local_name = local_entry["url"].as_str().unwrap();
        assert_eq!(name, format!("{local_name}.gz"));
        let plain = gunzip(&remote[name]);
        let mut lines: Vec<&[u8]> = plain.split(|&b| b == b'\n').collect();
        let mut want: Vec<&[u8]> = local[local_name].split(|&b| b == b'\n').collect();
        // Bulk files of one type download concurrently: compare the lines, not their order.
        lines.sort();
        want.sort();
        assert!(lines == want, "{name}: the same resources as the local run");
        for field in ["type", "count", "bytes"] {
            assert_eq!(entry[field], local_entry[field], "{name}: {field}");
        }
        let sha = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &plain);
        assert_eq!(
            entry["sha256"],
            epic_export::text::hex(sha.as_ref()),
            "{name}"
        );
        assert!(remote[name].len() < plain.len() / 3, "{name} is compressed");
    }
    // Both runs are kept (keepRuns 30).
    let all = objects(&t.store, &format!("{PREFIX}/test-export")).await;
    assert!(all.keys().any(|k| k.starts_with(&format!("{run_id}/"))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_runs_match_a_local_run() {
    same_as_local(s3().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_runs_match_a_local_run() {
    same_as_local(azure().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcs_runs_match_a_local_run() {
    same_as_local(gcs().await).await;
}

/// Run ids of the export in the store (folders under `<prefix>/test-export/`).
async fn run_ids(t: &Target) -> Vec<String> {
    let base = ObjectPath::from(format!("{PREFIX}/test-export"));
    let listed = t.store.list_with_delimiter(Some(&base)).await.unwrap();
    let mut ids: Vec<String> = listed
        .common_prefixes
        .iter()
        .filter_map(|p| p.filename().map(str::to_owned))
        .collect();
    ids.sort();
    ids
}

/// Search runs killed at moments spread over a run (while parts of files larger than one part are
/// uploading, while files are completed, while the run is published) never leave a visible run:
/// `latest.json` still names a complete run, and a killed run has no manifest. The next run
/// succeeds and removes the killed runs' objects; then `keepRuns: 2` keeps the two newest runs.
/// A bulk run killed after its kick-off is resumed by the next run without a second kick-off, even
/// when its working folder is gone (a new pod): the status URL is kept in the store too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_uploads_are_never_a_run_and_retention_keeps_the_newest() {
    let t = s3().await;
    let env = env(quick(SandboxOptions {
        patients: 300,
        ..SandboxOptions::default()
    }))
    .await;
    let patients = env.sandbox.dataset().patient_ids();
    let config = env.write_config(&patients, ALL_SEARCHES, FAST_LIMITS);
    to_store(&config, &t.url, "  keepRuns: 2\n");

    let started = std::time::Instant::now();
    let first = run_with(&config, &t.env).await;
    let span = started.elapsed();
    assert!(first.status.success(), "{}", text(&first));
    let (first_id, run) = latest_run(&t).await;
    let manifest = json(&run["manifest.json"]);
    let largest = manifest["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["bytes"].as_u64().unwrap())
        .max()
        .unwrap();
    assert!(
        largest > 5 * 1024 * 1024,
        "a file spans several parts: {largest} bytes"
    );

    let mut complete = vec![first_id.clone()];
    for fraction in [0.3, 0.5, 0.7, 0.85, 0.95] {
        tokio::time::sleep(Duration::from_millis(1100)).await; // a new run id (one per second)
        let mut child = command(&config, &t.env).spawn().unwrap();
        tokio::time::sleep(span.mul_f64(fraction)).await;
        if child.try_wait().unwrap().is_some() {
            continue;
        }
        child.start_kill().unwrap();
        child.wait().await.unwrap();
        // A request the run had sent whole may still be finishing at the server.
        tokio::time::sleep(Duration::from_millis(500)).await;
        // latest.json names a complete run; a run with a manifest has every file it lists, whole
        // (the kill may land after the manifest); any other run is leftovers, never a run.
        let (latest, _) = latest_run(&t).await;
        for id in run_ids(&t).await {
            let run = objects(&t.store, &format!("{PREFIX}/test-export/{id}")).await;
            let Some(manifest) = run.get("manifest.json") else {
                assert_ne!(id, latest, "latest.json names a run without a manifest");
                continue;
            };
            for entry in json(manifest)["output"].as_array().unwrap() {
                let name = entry["url"].as_str().unwrap();
                assert_eq!(
                    run.get(name).map(|o| o.len() as u64),
                    entry["bytes"].as_u64(),
                    "{id}: {name} is whole"
                );
            }
            if !complete.contains(&id) {
                eprintln!("the run {id} had written its manifest when it was killed");
                complete.push(id);
            }
        }
    }
    // A manifest the killed run had sent whole may have been stored after the checks above (a
    // loaded server): the runs that count as complete are those with a manifest now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for id in run_ids(&t).await {
        let manifest = ObjectPath::from(format!("{PREFIX}/test-export/{id}/manifest.json"));
        if t.store.head(&manifest).await.is_ok() && !complete.contains(&id) {
            eprintln!("the run {id} had sent its manifest when it was killed");
            complete.push(id);
        }
    }
    // What a run killed between completing its files and writing its manifest leaves (the window
    // is short; the kills above land in it by chance only).
    let leftover = "20200101T000000Z";
    for name in ["Patient.ndjson", "errors/failed-requests.ndjson"] {
        let path = ObjectPath::from(format!("{PREFIX}/test-export/{leftover}/{name}"));
        t.store.put(&path, b"{}\n".to_vec().into()).await.unwrap();
    }

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let next = run_with(&config, &t.env).await;
    assert!(next.status.success(), "{}", text(&next));
    let (next_id, _) = latest_run(&t).await;
    let newest_complete = complete.iter().max().unwrap().clone();
    assert!(next_id > newest_complete);
    assert_eq!(
        run_ids(&t).await,
        [newest_complete, next_id.clone()],
        "the killed runs' objects are removed"
    );

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let third = run_with(&config, &t.env).await;
    assert!(third.status.success(), "{}", text(&third));
    let (third_id, _) = latest_run(&t).await;
    assert_eq!(
        run_ids(&t).await,
        [next_id, third_id.clone()],
        "keepRuns: 2"
    );

    let config = env.write_bulk_config(&group_block(), FAST_LIMITS);
    to_store(&config, &t.url, "  keepRuns: 2\n");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut child = command(&config, &t.env).spawn().unwrap();
    while env.sandbox.stats().bulk_downloads == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    assert_eq!(
        latest_run(&t).await.0,
        third_id,
        "the killed bulk run is not visible"
    );
    let kickoffs = env.sandbox.stats().bulk_kickoffs;
    let resumed = run_with(&config, &t.env).await;
    assert!(resumed.status.success(), "{}", text(&resumed));
    assert_eq!(
        env.sandbox.stats().bulk_kickoffs,
        kickoffs,
        "no second kick-off"
    );
    let (resumed_id, run) = latest_run(&t).await;
    assert!(resumed_id > third_id);
    assert!(run.contains_key("Observation.ndjson"));
}

/// Credentials the store refuses stop the run before the FHIR server is asked for anything; the
/// message names output.url and where credentials come from, never the secret.
async fn refused(t: Target, secret_var: &str) {
    let env = env(SandboxOptions::default()).await;
    let patients: Vec<String> = env.sandbox.dataset().patient_ids()[..2].to_vec();
    let config = env.write_config(&patients, ALL_SEARCHES, FAST_LIMITS);
    to_store(&config, &t.url, "");
    let wrong = "d3JvbmctYnV0LXdlbGwtZm9ybWVkLXNlY3JldA==";
    let right = t
        .env
        .iter()
        .find(|(k, _)| k == secret_var)
        .map(|(_, v)| v.clone())
        .unwrap();
    let vars: Vec<(String, String)> = t
        .env
        .iter()
        .map(|(k, v)| {
            let v = if k == secret_var {
                wrong.into()
            } else {
                v.clone()
            };
            (k.clone(), v)
        })
        .collect();
    let before = env.sandbox.stats();
    let out = run_with(&config, &vars).await;
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(all.contains("output.url"), "{all}");
    assert!(all.contains(&t.url), "{all}");
    assert!(all.contains("credentials"), "{all}");
    assert!(!all.contains(wrong) && !all.contains(&right), "{all}");
    let after = env.sandbox.stats();
    assert_eq!(
        after.fhir_requests, before.fhir_requests,
        "nothing was asked of the FHIR server"
    );
    assert!(run_ids(&t).await.is_empty());

    // `check` says the same, and that the right credentials work.
    let check = |vars: Vec<(String, String)>| {
        let config = config.clone();
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_epic-export"))
                .args(["check", "--config"])
                .arg(&config)
                .envs(vars)
                .output()
                .await
                .unwrap()
        }
    };
    let out = check(vars).await;
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(all.contains("output: FAILED"), "{all}");
    assert!(!all.contains(wrong) && !all.contains(&right), "{all}");
    let out = check(t.env.clone()).await;
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(all.contains(&format!("output: ok ({}", t.url)), "{all}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_refused_credentials_are_named_without_the_secret() {
    refused(s3().await, "AWS_SECRET_ACCESS_KEY").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_refused_credentials_are_named_without_the_secret() {
    refused(azure().await, "AZURE_STORAGE_ACCOUNT_KEY").await;
}

/// Peak RSS of `epic-export run` (as `wait4` reports it for the child), in MiB, and its exit code.
#[allow(
    clippy::zombie_processes,
    reason = "the child is reaped by wait4, not Child::wait"
)]
fn run_measured(config: &Path, env: &[(String, String)]) -> (i32, f64, String) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_epic-export"))
        .args(["run", "--no-progress", "--config"])
        .arg(config)
        .envs(env.iter().cloned())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: the pid is our child's, status and usage are valid for writes.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32);
    (
        libc::WEXITSTATUS(status),
        usage.ru_maxrss as f64 / 1024.0,
        stderr,
    )
}

/// A bulk export much larger than memory allows to hold (about 100 MiB of NDJSON, 20 parts of its
/// largest file) streams to S3 within the documented bound: 64 MiB plus `partSize` × `uploadConcurrency`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_export_to_s3_stays_within_the_memory_bound() {
    let t = s3().await;
    let env = env(quick(SandboxOptions {
        patients: 2000,
        ..SandboxOptions::default()
    }))
    .await;
    let config = env.write_bulk_config(&group_block(), FAST_LIMITS);
    let (_, local_rss, _) = tokio::task::spawn_blocking({
        let (config, vars) = (config.clone(), t.env.clone());
        move || run_measured(&config, &vars)
    })
    .await
    .unwrap();
    eprintln!("to a local folder: peak RSS {local_rss:.1} MiB");
    to_store(
        &config,
        &t.url,
        "  partSize: 5242880\n  uploadConcurrency: 2\n",
    );
    let (code, rss, stderr) = tokio::task::spawn_blocking({
        let (config, vars) = (config.clone(), t.env.clone());
        move || run_measured(&config, &vars)
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{stderr}");
    let (_, run) = latest_run(&t).await;
    let total: u64 = json(&run["manifest.json"])["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["bytes"].as_u64().unwrap())
        .sum();
    eprintln!("{total} bytes exported; peak RSS {rss:.1} MiB");
    assert!(total > 90 * 1024 * 1024, "a large export: {total} bytes");
    assert!(rss <= 64.0 + 5.0 * 2.0, "peak RSS {rss:.1} MiB");
}

/// `compression: gzip` applies to a local folder too: the same resources as an uncompressed run,
/// rewritten attachment types included, with the manifest describing the NDJSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_run_can_be_gzip_compressed() {
    let env = env(SandboxOptions::default()).await;
    let patients: Vec<String> = env.sandbox.dataset().patient_ids()[..4].to_vec();
    let settings = format!(
        "limits:\n  concurrency: 1\n  requestsPerSecond: 0\n  maxAttempts: 5\nattachments:\n  enabled: true\n{HYDRATE}"
    );
    let config = env.write_config(&patients, ALL_SEARCHES, &settings);
    let plain = files_of(&run_config(&config).await.dir);
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace(
            "output:\n  directory: out\n",
            "output:\n  directory: out\n  compression: gzip\n",
        ),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await; // a new run id
    let compressed = files_of(&run_config(&config).await.dir);
    let manifest = json(&compressed["manifest.json"]);
    let outputs = manifest["output"].as_array().unwrap();
    assert!(outputs.iter().any(|e| e["type"] == "DocumentReference"));
    for entry in outputs {
        let name = entry["url"].as_str().unwrap();
        let original = name.strip_suffix(".gz").expect("compressed");
        let content = gunzip(&compressed[name]);
        assert!(
            same_content(original, &content, &plain[original]),
            "{name}: the same NDJSON"
        );
        let sha = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &content);
        assert_eq!(
            entry["sha256"],
            epic_export::text::hex(sha.as_ref()),
            "{name}"
        );
        assert!(
            !compressed.contains_key(original),
            "{original} is not left uncompressed"
        );
    }
}
