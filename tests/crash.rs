//! Crash consistency, measured: the exporter is killed with SIGKILL at random moments of a search run
//! and of a bulk run (30 kills each), and after every kill:
//! - `latest` points to a complete run or to nothing, and every folder named like a run is complete
//!   (its manifest lists files that exist with the listed size and SHA-256);
//! - the next run completes (and is itself checked the same way);
//! - a bulk run killed after it saved its status URL is resumed by the next run without a second
//!   kick-off.
//!
//! The kill moments come from a seeded generator (the seed is printed); each test prints what the
//! kills found (which stage they hit, the leftovers the next run swept).

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use epic_export::sandbox::{SANDBOX_GROUP_ID, SandboxOptions};
use serde_json::Value;
use support::*;

const KILLS: usize = 30;

/// A small xorshift generator: reproducible kill moments from a printed seed.
struct Rng(u64);

impl Rng {
    fn from_time() -> Rng {
        let seed = std::env::var("CRASH_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("kill moments from seed {seed} (CRASH_SEED={seed} repeats them)");
        Rng(seed)
    }

    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn spawn(config: &Path) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_epic-export"))
        .args(["run", "--no-progress", "--config"])
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

fn sha256_hex(bytes: &[u8]) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Checks that `dir` is a complete run: manifest and summary, every listed file with its size and
/// checksum, every resource file listed.
fn assert_complete(dir: &Path) {
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(dir.join("manifest.json")).unwrap_or_else(|e| {
            panic!(
                "{}: a run folder without manifest.json ({e})",
                dir.display()
            )
        }),
    )
    .unwrap();
    let summary: Value =
        serde_json::from_slice(&std::fs::read(dir.join("summary.json")).unwrap()).unwrap();
    assert!(
        matches!(summary["outcome"].as_str(), Some("success" | "partial")),
        "{}: {summary}",
        dir.display()
    );
    let mut listed = 0;
    for list in ["output", "error", "deleted"] {
        for f in manifest[list].as_array().unwrap() {
            let bytes = std::fs::read(dir.join(f["url"].as_str().unwrap())).unwrap();
            assert_eq!(f["bytes"].as_u64().unwrap(), bytes.len() as u64);
            assert_eq!(f["sha256"].as_str().unwrap(), sha256_hex(&bytes));
            listed += 1;
        }
    }
    let on_disk = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.ends_with(".ndjson") && name != "log.ndjson"
        })
        .count();
    assert!(on_disk <= listed, "{}: unlisted files", dir.display());
}

/// What a kill left in the export folder (names of leftovers by kind).
fn check_export(export: &Path) -> BTreeMap<&'static str, usize> {
    let mut found = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(export) else {
        *found.entry("no export folder yet").or_default() += 1;
        return found;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let kind = if name == "latest" {
            let target = std::fs::read_link(e.path()).unwrap();
            assert!(
                !target.to_string_lossy().starts_with('.'),
                "latest points at a staging folder: {target:?}"
            );
            assert_complete(&export.join(target));
            "latest"
        } else if name.starts_with(".") && name.ends_with(".partial") {
            if e.path().join("bulk-status.json").exists() {
                "staging folder with a saved status URL"
            } else {
                "staging folder"
            }
        } else if name.ends_with(".removing") {
            "old run being removed"
        } else if name.ends_with(".failed") {
            "failed run"
        } else if name.starts_with('2') {
            assert_complete(&e.path());
            "complete run"
        } else {
            continue;
        };
        *found.entry(kind).or_default() += 1;
    }
    found
}

/// Whether a killed bulk run left its status URL for the next run.
fn saved_status_url(export: &Path) -> bool {
    std::fs::read_dir(export)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.path().join("bulk-status.json").exists())
}

/// `keepRuns: 2`, so that old runs are removed often (and kills can land in a removal).
fn keep_two_runs(config: &Path) {
    let yaml = std::fs::read_to_string(config)
        .unwrap()
        .replace("  directory: out\n", "  directory: out\n  keepRuns: 2\n");
    std::fs::write(config, yaml).unwrap();
}

/// Runs to completion and checks the result.
async fn complete_run(config: &Path, export: &Path) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_epic-export"))
        .args(["run", "--no-progress", "--config"])
        .arg(config)
        .output()
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "the run after a kill completes:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let found = check_export(export);
    assert_eq!(found.get("latest"), Some(&1));
    assert_eq!(found.get("staging folder"), None, "{found:?}");
    assert_eq!(found.get("old run being removed"), None, "{found:?}");
    read_run(&export.join("latest"));
}

/// Kills runs of `config` at random moments within `span`, checking after each kill and after the
/// run that follows. Returns what the kills found, by kind.
async fn kill_repeatedly(
    env: &Env,
    config: &Path,
    span: Duration,
    bulk: bool,
) -> BTreeMap<String, usize> {
    let export: PathBuf = env.export_dir();
    let mut rng = Rng::from_time();
    let mut findings: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..KILLS {
        let kickoffs_before = env.sandbox.stats().bulk_kickoffs;
        let mut child = spawn(config);
        let at = span.mul_f64(rng.unit());
        tokio::time::sleep(at).await;
        let started = Instant::now();
        let exited_before_kill = child.try_wait().unwrap().is_some();
        child.start_kill().ok();
        child.wait().await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        let found = check_export(&export);
        for (kind, n) in &found {
            *findings.entry(kind.to_string()).or_default() += n.min(&1);
        }
        if exited_before_kill {
            *findings
                .entry("run ended before the kill".into())
                .or_default() += 1;
        }
        let saved = bulk && saved_status_url(&export);
        let kickoffs_at_kill = env.sandbox.stats().bulk_kickoffs;
        complete_run(config, &export).await;
        if saved {
            assert_eq!(
                env.sandbox.stats().bulk_kickoffs,
                kickoffs_at_kill,
                "kill {i} at {at:?}: the next run resumed the saved export without a second kick-off"
            );
            *findings
                .entry("resumed without a second kick-off".into())
                .or_default() += 1;
        }
        assert!(env.sandbox.stats().bulk_kickoffs <= kickoffs_before + 2);
    }
    findings
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_search_runs_never_look_complete_and_the_next_run_completes() {
    let env = env(SandboxOptions {
        patients: 16,
        page_size: 5,
        latency: Duration::from_millis(3),
        ..SandboxOptions::default()
    })
    .await;
    let patients = env.sandbox.dataset().patient_ids();
    let config = env.write_config(&patients, ALL_SEARCHES, FAST_LIMITS);
    keep_two_runs(&config);
    // One full run to measure how long a run takes; kills land anywhere within that time.
    let t = Instant::now();
    complete_run(&config, &env.export_dir()).await;
    let span = t.elapsed();
    let findings = kill_repeatedly(&env, &config, span, false).await;
    eprintln!(
        "search: {KILLS} kills within {span:?}; after the kills the folder held: {findings:#?}"
    );
    assert_same_data(
        &read_run(&env.export_dir().join("latest")),
        &expected(env.sandbox.dataset(), &patients),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_bulk_runs_resume_without_a_second_kick_off() {
    let env = env(SandboxOptions {
        patients: 16,
        latency: Duration::from_millis(2),
        bulk_delay: Duration::from_millis(300),
        bulk_retry_after: Some("1".into()),
        bulk_file_size: 25,
        bulk_throttle: Duration::ZERO,
        ..SandboxOptions::default()
    })
    .await;
    let config = env.write_bulk_config(&format!("    group: {SANDBOX_GROUP_ID}\n"), FAST_LIMITS);
    keep_two_runs(&config);
    let t = Instant::now();
    complete_run(&config, &env.export_dir()).await;
    let span = t.elapsed();
    let findings = kill_repeatedly(&env, &config, span, true).await;
    eprintln!(
        "bulk: {KILLS} kills within {span:?}; after the kills the folder held: {findings:#?}"
    );
    assert!(
        findings
            .get("resumed without a second kick-off")
            .is_some_and(|n| *n > 0),
        "some kills hit a run that had saved its status URL: {findings:?}"
    );
    let ds = env.sandbox.dataset();
    assert_same_data(
        &read_run(&env.export_dir().join("latest")),
        &expected_all(ds, &ds.patient_ids()),
    );
}
