//! A full disk, for real: the exporter runs under `ulimit -f` (a write past the limit fails with
//! `EFBIG`, the error a full volume gives as `ENOSPC`), in search and in bulk mode. The run must fail
//! with a message naming the file and the OS error, send the failure e-mail, leave nothing that looks
//! complete (no `latest`, no resource files kept), and the next run must start clean: a search run
//! from scratch, a bulk run by downloading the same export again without a second kick-off.

#[path = "support/smtp.rs"]
mod smtp;
mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use epic_export::sandbox::{SANDBOX_GROUP_ID, SandboxOptions};
use serde_json::Value;
use smtp::{PASSWORD, USER, fixtures, smtp_server};
use support::*;

/// Runs `epic-export run` with its file-size limit at `limit_kib` KiB (bash's `ulimit -f`), if any.
async fn run_limited(config: &Path, limit_kib: Option<u64>) -> std::process::Output {
    let script = match limit_kib {
        Some(k) => format!("ulimit -f {k} && exec \"$0\" run --no-progress --config \"$1\""),
        None => "exec \"$0\" run --no-progress --config \"$1\"".to_owned(),
    };
    tokio::process::Command::new("bash")
        .arg("-c")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_epic-export"))
        .arg(config)
        .env("RUST_LOG", "info")
        .env("TEST_SMTP_PASSWORD", PASSWORD)
        .output()
        .await
        .unwrap()
}

fn notify_on_failure(port: u16) -> String {
    format!(
        "notify:\n  email:\n    host: 127.0.0.1\n    port: {port}\n    caFile: {}\n    username: {USER}\n    passwordEnv: TEST_SMTP_PASSWORD\n    from: {USER}\n    to: [team@example.org]\n    on: [failure]\n",
        fixtures().join("ca.pem").display()
    )
}

/// The one `.<id>.failed` folder of the export.
fn failed_run(export: &Path) -> PathBuf {
    let failed: Vec<PathBuf> = std::fs::read_dir(export)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".failed"))
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    failed.into_iter().next().unwrap()
}

async fn wait_for_mail(dir: &Path) -> Value {
    let json = dir.join("1.json");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !json.exists() {
        assert!(std::time::Instant::now() < deadline, "no e-mail arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap()
}

/// What every disk-full run must show.
fn assert_failed_cleanly(export: &Path, stderr: &str) {
    assert!(
        stderr.contains("File too large (os error 27)") && stderr.contains(".ndjson"),
        "the message names the file and the OS error:\n{stderr}"
    );
    assert!(!export.join("latest").exists(), "nothing is published");
    let failed = failed_run(export);
    let summary: Value =
        serde_json::from_slice(&std::fs::read(failed.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["outcome"], "failed");
    let first = summary["errors"][0].as_str().unwrap();
    assert!(
        first.starts_with("writing output failed: ")
            && first.contains("os error 27")
            && first.contains(".partial/"),
        "{first}"
    );
    let data: Vec<_> = std::fs::read_dir(&failed)
        .unwrap()
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.ends_with(".ndjson") && name != "log.ndjson"
        })
        .collect();
    assert!(
        data.is_empty(),
        "the failed run keeps no resource files: {data:?}"
    );
    assert!(!failed.join("manifest.json").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_a_search_run_reports_it_and_the_next_run_starts_clean() {
    let server = smtp_server("starttls").await;
    let env = env(SandboxOptions {
        patients: 30,
        ..SandboxOptions::default()
    })
    .await;
    let patients = env.sandbox.dataset().patient_ids();
    let config = env.write_config(
        &patients,
        ALL_SEARCHES,
        &format!("{FAST_LIMITS}{}", notify_on_failure(server.port)),
    );

    let out = run_limited(&config, Some(96)).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "failed, not killed:\n{stderr}");
    assert_failed_cleanly(&env.export_dir(), &stderr);
    let mail = wait_for_mail(server.maildir.path()).await;
    assert!(
        mail["subject"].as_str().unwrap().contains("failed"),
        "{mail}"
    );

    // With room again, the next run exports everything.
    let out = run_limited(&config, None).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let latest = env.export_dir().join("latest");
    assert!(latest.join("manifest.json").is_file());
    assert_same_data(
        &read_run(&latest),
        &expected(env.sandbox.dataset(), &patients),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_a_bulk_run_and_the_next_run_downloads_the_same_export() {
    let env = env(SandboxOptions {
        patients: 30,
        bulk_delay: Duration::from_millis(200),
        // A second kick-off within the hour would be refused, as Epic does within a day.
        bulk_throttle: Duration::from_secs(3600),
        ..SandboxOptions::default()
    })
    .await;
    let config = env.write_bulk_config(&format!("    group: {SANDBOX_GROUP_ID}\n"), FAST_LIMITS);

    let out = run_limited(&config, Some(96)).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "failed, not unfinished:\n{stderr}"
    );
    assert_failed_cleanly(&env.export_dir(), &stderr);
    assert_eq!(env.sandbox.stats().bulk_kickoffs, 1);

    let out = run_limited(&config, None).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        env.sandbox.stats().bulk_kickoffs,
        1,
        "the same export was downloaded again, not kicked off anew"
    );
    let latest = env.export_dir().join("latest");
    let summary: Value =
        serde_json::from_slice(&std::fs::read(latest.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["bulk"]["resumed"], true);
    let ds = env.sandbox.dataset();
    assert_same_data(&read_run(&latest), &expected_all(ds, &ds.patient_ids()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_while_downloading_attachments_fails_the_run_and_frees_the_space() {
    let env = env(SandboxOptions {
        patients: 6,
        ..SandboxOptions::default()
    })
    .await;
    let patients = env.sandbox.dataset().patient_ids();
    let resources = "resource_type,search_params\nDocumentReference,\n";
    let config = env.write_config(
        &patients,
        resources,
        &format!("{FAST_LIMITS}attachments:\n  enabled: true\n"),
    );
    // The notes' NDJSON fits in 24 KiB; the scanned PDFs (6-32 KB each) do not all.
    let out = run_limited(&config, Some(24)).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "failed, not killed:\n{stderr}");
    assert!(
        stderr.contains("File too large (os error 27)")
            && stderr.contains("attachments/.download-"),
        "the message names the document being written and the OS error:\n{stderr}"
    );
    assert!(
        !env.export_dir().join("latest").exists(),
        "nothing is published"
    );
    let failed = failed_run(&env.export_dir());
    assert!(
        !failed.join("attachments").exists(),
        "the documents are removed"
    );
    let left: Vec<_> = std::fs::read_dir(&failed)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".ndjson") && n != "log.ndjson")
        .collect();
    assert!(
        left.is_empty(),
        "no resource file (nor its set-aside original) is kept: {left:?}"
    );

    // With room again, the next run downloads every document.
    let out = run_limited(&config, None).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let latest = env.export_dir().join("latest");
    let summary: Value =
        serde_json::from_slice(&std::fs::read(latest.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["attachments"]["failed"], 0);
    assert!(summary["attachments"]["files"].as_u64().unwrap() > 0);
}
