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
        "attachments: ",
        "hydrated: ",
        "Medication",
        "Practitioner",
    ] {
        assert!(
            stdout.contains(needle),
            "{needle:?} missing from:\n{stdout}"
        );
    }
    let latest = dir.path().join("output/demo/latest");
    let patients = std::fs::read_to_string(latest.join("Patient.ndjson")).unwrap();
    assert_eq!(patients.lines().count(), 5);
    // The notes' documents are files the DocumentReferences link to; the Medications are there.
    let documents = std::fs::read_dir(latest.join("attachments"))
        .unwrap()
        .count();
    assert!(documents > 0, "no attachment files");
    let notes = std::fs::read_to_string(latest.join("DocumentReference.ndjson")).unwrap();
    assert!(notes.contains("\"url\":\"attachments/"), "{notes}");
    assert!(latest.join("Medication.ndjson").exists());
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
        stdout.contains("bulk export")
            && stdout.contains("Observation.ndjson")
            && stdout.contains("attachments: "),
        "{stdout}"
    );
    let config = std::fs::read_to_string(dir.path().join("epic-export.yaml")).unwrap();
    assert!(config.contains("bulk:") && config.contains("group:"));
    let patients =
        std::fs::read_to_string(dir.path().join("output/demo/latest/Patient.ndjson")).unwrap();
    assert_eq!(patients.lines().count(), 4);
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Parses a Secret manifest the way Kubernetes tooling in Rust would, and loads the key in it.
fn parse_secret(
    yaml: &str,
    data_key: &str,
) -> (
    k8s_openapi::api::core::v1::Secret,
    epic_export::auth::SigningKey,
) {
    let secret: k8s_openapi::api::core::v1::Secret = serde_saphyr::from_str(yaml).unwrap();
    let pem = &secret.data.as_ref().unwrap()[data_key].0;
    let key =
        epic_export::auth::SigningKey::from_pem(pem, std::path::Path::new("secret"), None, None)
            .unwrap();
    (secret, key)
}

#[test]
fn keygen_k8s_secret_prints_a_secret_manifest() {
    let out = bin()
        .args([
            "keygen",
            "--alg",
            "ES384",
            "--k8s-secret",
            "epic-key",
            "--namespace",
            "phi",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let yaml = String::from_utf8(out.stdout.clone()).unwrap();
    assert!(!yaml.contains("BEGIN"), "the PEM is base64 in data");
    let (secret, key) = parse_secret(&yaml, "private.pem");
    assert_eq!(secret.metadata.name.as_deref(), Some("epic-key"));
    assert_eq!(secret.metadata.namespace.as_deref(), Some("phi"));
    assert_eq!(secret.type_.as_deref(), Some("Opaque"));
    assert!(secret.metadata.labels.is_none());
    let annotations = secret.metadata.annotations.unwrap();
    assert_eq!(annotations["fhirexport.dev/kid"], key.kid());
    assert_eq!(key.algorithm().as_str(), "ES384");
    // The value is kubectl-ready: the YAML also has the plain apiVersion/kind lines.
    assert!(yaml.contains("apiVersion: v1\nkind: Secret\n"), "{yaml}");
    // stderr has the kid and the public JWKS, and no private key.
    let stderr = stderr_of(&out);
    assert!(stderr.contains(&format!("kid: {}", key.kid())), "{stderr}");
    let json_start = stderr.find('{').unwrap();
    let jwks: serde_json::Value = serde_json::from_str(&stderr[json_start..]).unwrap();
    assert_eq!(jwks["keys"][0], key.public_jwk());
    assert!(!stderr.contains("PRIVATE KEY") && !stderr.contains("\"d\""));

    // Default algorithm (RS384) and a staged rotation key.
    let out = bin()
        .args([
            "keygen",
            "--k8s-secret",
            "epic-key",
            "--secret-key",
            "next-private.pem",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let yaml = String::from_utf8(out.stdout.clone()).unwrap();
    let (secret, key) = parse_secret(&yaml, "next-private.pem");
    assert!(secret.metadata.namespace.is_none());
    assert_eq!(key.algorithm().as_str(), "RS384");
}

#[test]
fn keygen_k8s_secret_with_out_writes_three_files_and_never_overwrites() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let out = bin()
        .args([
            "keygen",
            "--alg",
            "ES384",
            "--k8s-secret",
            "epic-key",
            "--out",
        ])
        .arg(&keys)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let secret_file = keys.join("epic-key.secret.yaml");
    assert!(
        stdout.contains(&secret_file.display().to_string()),
        "{stdout}"
    );
    assert!(!stdout.contains("PRIVATE KEY"));
    for f in ["private.pem", "epic-key.secret.yaml"] {
        let mode = std::fs::metadata(keys.join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    let pem = std::fs::read(keys.join("private.pem")).unwrap();
    let yaml = std::fs::read_to_string(&secret_file).unwrap();
    let (secret, key) = parse_secret(&yaml, "private.pem");
    assert_eq!(secret.data.unwrap()["private.pem"].0, pem, "the same key");
    let jwks: serde_json::Value =
        serde_json::from_slice(&std::fs::read(keys.join("jwks.json")).unwrap()).unwrap();
    assert_eq!(jwks["keys"][0]["kid"], key.kid());

    // Again into the same folder: refused, nothing changed.
    let keygen_into = |out: &std::path::Path, needle: &str| {
        let refused = bin()
            .args(["keygen", "--k8s-secret", "epic-key", "--out"])
            .arg(out)
            .output()
            .unwrap();
        assert!(!refused.status.success());
        let stderr = stderr_of(&refused);
        assert!(stderr.contains(needle), "{stderr}");
    };
    keygen_into(&keys, "already exists");
    assert_eq!(std::fs::read(keys.join("private.pem")).unwrap(), pem);
    assert_eq!(std::fs::read_to_string(&secret_file).unwrap(), yaml);

    // Only the manifest exists: refused before any key file is written.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("epic-key.secret.yaml"), "keep me").unwrap();
    keygen_into(&other, "epic-key.secret.yaml");
    assert!(!other.join("private.pem").exists() && !other.join("jwks.json").exists());
}

#[test]
fn keygen_rejects_bad_secret_names_and_missing_targets() {
    for (args, needle) in [
        (vec!["--k8s-secret", "Epic_Key"], "not a valid Secret name"),
        (
            vec!["--k8s-secret", "epic-key", "--secret-key", "a/b"],
            "not a valid Secret key",
        ),
        (
            vec!["--k8s-secret", "epic-key", "--namespace", "a.b"],
            "not a valid namespace",
        ),
        (
            vec!["--namespace", "phi", "--out", "/nonexistent/x"],
            "--k8s-secret",
        ),
        (vec![], "--out"),
    ] {
        let out = bin().arg("keygen").args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = stderr_of(&out);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}: nothing printed");
    }
}

#[test]
fn jwks_prints_one_set_for_several_keys_and_refuses_duplicate_kids() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["a", "b"] {
        let out = bin()
            .args(["keygen", "--alg", "ES384", "--out"])
            .arg(dir.path().join(name))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr_of(&out));
    }
    let a = dir.path().join("a/private.pem");
    let b = dir.path().join("b/private.pem");
    let spaced = bin()
        .args(["jwks", "--key"])
        .arg(&a)
        .arg(&b)
        .output()
        .unwrap();
    let repeated = bin()
        .args(["jwks", "--key"])
        .arg(&a)
        .arg("--key")
        .arg(&b)
        .output()
        .unwrap();
    assert!(spaced.status.success(), "{}", stderr_of(&spaced));
    assert!(repeated.status.success(), "{}", stderr_of(&repeated));
    assert_eq!(spaced.stdout, repeated.stdout);
    let set: serde_json::Value = serde_json::from_slice(&spaced.stdout).unwrap();
    let kid = |p: &std::path::Path| {
        serde_json::from_slice::<serde_json::Value>(
            &std::fs::read(p.parent().unwrap().join("jwks.json")).unwrap(),
        )
        .unwrap()["keys"][0]["kid"]
            .clone()
    };
    assert_eq!(set["keys"].as_array().unwrap().len(), 2);
    assert_eq!(set["keys"][0]["kid"], kid(&a));
    assert_eq!(set["keys"][1]["kid"], kid(&b));
    assert!(!String::from_utf8_lossy(&spaced.stdout).contains("\"d\""));

    // --kid names the keys (for auth.keyId), one per key in order.
    let named = bin()
        .args(["jwks", "--key"])
        .arg(&a)
        .arg(&b)
        .args(["--kid", "old-1", "new-2"])
        .output()
        .unwrap();
    assert!(named.status.success(), "{}", stderr_of(&named));
    let named: serde_json::Value = serde_json::from_slice(&named.stdout).unwrap();
    assert_eq!(named["keys"][0]["kid"], "old-1");
    assert_eq!(named["keys"][1]["kid"], "new-2");
    assert_eq!(named["keys"][1]["x"], set["keys"][1]["x"]);
    for kids in [&["only-one"][..], &["same", "same"][..]] {
        let bad = bin()
            .args(["jwks", "--key"])
            .arg(&a)
            .arg(&b)
            .arg("--kid")
            .args(kids)
            .output()
            .unwrap();
        assert_eq!(bad.status.code(), Some(1), "{kids:?}");
        assert!(bad.stdout.is_empty());
        let stderr = stderr_of(&bad);
        assert!(
            stderr.contains("one kid per key") || stderr.contains("have the same kid same"),
            "{kids:?}: {stderr}"
        );
    }

    // The same key twice (here a copy): refused, naming both files and the kid.
    let copy = dir.path().join("copy.pem");
    std::fs::copy(&a, &copy).unwrap();
    let dup = bin()
        .args(["jwks", "--key"])
        .arg(&a)
        .arg(&b)
        .arg(&copy)
        .output()
        .unwrap();
    assert_eq!(dup.status.code(), Some(1));
    assert!(dup.stdout.is_empty());
    let stderr = stderr_of(&dup);
    assert!(
        stderr.contains(&a.display().to_string())
            && stderr.contains(&copy.display().to_string())
            && stderr.contains(kid(&a).as_str().unwrap())
            && stderr.contains("same kid"),
        "{stderr}"
    );
}

#[test]
fn keygen_k8s_secret_into_a_closed_pipe_does_not_panic() {
    let mut child = bin()
        .args(["keygen", "--k8s-secret", "epic-key"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Close the reading end at once, like `| kubectl apply -f -` when kubectl fails to start.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = stderr_of(&out);
    assert!(!stderr.contains("panicked"), "{stderr}");
    if !out.status.success() {
        assert!(
            stderr.contains("cannot write the Secret manifest"),
            "{stderr}"
        );
    }
}
