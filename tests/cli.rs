//! The binary's commands as a user runs them: demo, keygen, jwks, and argument errors.

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_epic-export"))
}

#[test]
fn demo_runs_the_whole_flow_offline() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .args(["demo", "--patients", "5", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "Patient",
        "Observation",
        "Observation.ndjson",
        "success: 5 patients",
        "run folder:",
    ] {
        assert!(
            stdout.contains(needle),
            "{needle:?} missing from:\n{stdout}"
        );
    }
    let latest = dir.path().join("output/demo/latest");
    let patients = std::fs::read_to_string(latest.join("Patient.ndjson")).unwrap();
    assert_eq!(patients.lines().count(), 5);
    // The files it wrote are a working config for `run` (against a sandbox that is gone now).
    assert!(dir.path().join("epic-export.yaml").exists() && dir.path().join("roster.csv").exists());
    // Running the demo again in the same folder works too.
    let again = bin()
        .args(["demo", "--patients", "2", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
}

#[test]
fn keygen_then_jwks_prints_the_same_public_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .args(["keygen", "--alg", "ES384", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = bin()
        .args(["jwks", "--key"])
        .arg(dir.path().join("private.pem"))
        .output()
        .unwrap();
    assert!(printed.status.success());
    let a: serde_json::Value = serde_json::from_slice(&printed.stdout).unwrap();
    let b: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("jwks.json")).unwrap()).unwrap();
    assert_eq!(a, b);
    assert_eq!(a["keys"][0]["crv"], "P-384");

    let again = bin()
        .args(["keygen", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!again.status.success(), "never overwrites a key");
    assert!(String::from_utf8_lossy(&again.stderr).contains("private.pem"));

    let bad = bin()
        .args(["keygen", "--alg", "HS256", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("RS384"));
}

#[test]
fn a_missing_config_is_a_clear_error() {
    let out = bin()
        .args(["run", "--config", "/nonexistent/epic.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/epic.yaml") && stderr.contains("cannot read"),
        "{stderr}"
    );
}

#[test]
fn demo_bulk_runs_a_group_export() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .args(["demo", "--bulk", "--patients", "4", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("bulk export") && stdout.contains("Observation.ndjson"),
        "{stdout}"
    );
    let config = std::fs::read_to_string(dir.path().join("epic-export.yaml")).unwrap();
    assert!(config.contains("bulk:") && config.contains("group:"));
    let patients =
        std::fs::read_to_string(dir.path().join("output/demo/latest/Patient.ndjson")).unwrap();
    assert_eq!(patients.lines().count(), 4);
}
