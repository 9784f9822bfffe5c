//! E-mail notifications against a real SMTP server on loopback (aiosmtpd, tests/fixtures/smtp/server.py,
//! STARTTLS or TLS with a test-only certificate, AUTH required). The Python with aiosmtpd comes from
//! `EPIC_EXPORT_TEST_PYTHON`, which scripts/test.sh sets up; without it these tests fail.

mod support;

use std::path::Path;
use std::time::Duration;

use epic_export::sandbox::SandboxOptions;
use serde_json::Value;
use support::{ALL_SEARCHES, FAST_LIMITS, env};

#[path = "support/smtp.rs"]
mod smtp;
use smtp::{PASSWORD, USER, fixtures, free_port, smtp_server, smtp_server_with_cert};

/// `epic-export run` with extra environment variables.
async fn run(config: &Path, envs: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_epic-export"));
    cmd.args(["run", "--no-progress", "--config"])
        .arg(config)
        .env("RUST_LOG", "info");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().await.unwrap()
}

fn summary_json(env: &support::Env) -> Value {
    let path = env.export_dir().join("latest/summary.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn starttls_auth_message_has_counts_and_no_patient_ids() {
    let server = smtp_server("starttls").await;
    let env = env(SandboxOptions {
        patients: 6,
        ..SandboxOptions::default()
    })
    .await;
    let all_ids = env.sandbox.dataset().patient_ids();
    let patients: Vec<String> = all_ids[..4].to_vec();
    let notify = format!(
        "notify:\n  email:\n    host: 127.0.0.1\n    port: {}\n    tls: starttls\n    caFile: {}\n    username: {USER}\n    passwordEnv: TEST_SMTP_PASSWORD\n    from: \"Exports <{USER}>\"\n    to: [team@example.org, \"On Call <oncall@example.org>\"]\n    on: [success, partial, failure]\n",
        server.port,
        fixtures().join("ca.pem").display()
    );
    let config = env.write_config(&patients, ALL_SEARCHES, &format!("{FAST_LIMITS}{notify}"));
    let out = run(&config, &[("TEST_SMTP_PASSWORD", PASSWORD)]).await;
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert!(
        !stderr(&out).contains(PASSWORD),
        "the password is never logged"
    );

    let summary = summary_json(&env);
    assert_eq!(
        summary["notification"]["email"], "sent to 2 recipients",
        "summary.json records the notification: {summary:#}"
    );

    let eml = server.maildir.path().join("1.eml");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !eml.exists() {
        assert!(std::time::Instant::now() < deadline, "no message arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!server.maildir.path().join("2.eml").exists(), "one message");
    let raw = std::fs::read_to_string(&eml).unwrap();
    let parsed: Value = serde_json::from_str(
        &std::fs::read_to_string(server.maildir.path().join("1.json")).unwrap(),
    )
    .unwrap();
    let total = summary["recordsTotal"].as_u64().unwrap();
    assert!(total > 0);
    assert_eq!(
        parsed["subject"],
        format!("[epic-export] test-export: success — {total} records")
    );
    assert_eq!(parsed["contentType"], "multipart/alternative");
    let mut rcpts: Vec<&str> = parsed["rcptTos"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    rcpts.sort();
    assert_eq!(rcpts, ["oncall@example.org", "team@example.org"]);
    let part = |t: &str| -> String {
        parsed["parts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["type"] == t)
            .unwrap_or_else(|| panic!("no {t} part: {parsed:#}"))["content"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let text = part("text/plain");
    let html = part("text/html");

    let resources = summary["resources"].as_array().unwrap();
    assert!(resources.len() >= 2);
    for r in resources {
        let (t, records, bytes) = (
            r["type"].as_str().unwrap(),
            r["records"].as_u64().unwrap(),
            r["bytes"].as_u64().unwrap(),
        );
        let row = [t.to_string(), records.to_string(), bytes.to_string()];
        assert!(
            text.lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == row),
            "text part has the row {row:?}:\n{text}"
        );
        assert!(
            html.contains(&format!(
                "<tr><td>{t}</td><td align=\"right\">{records}</td><td align=\"right\">{bytes}</td></tr>"
            )),
            "html part has the row for {t}:\n{html}"
        );
    }
    let out_dir = summary["outputDir"].as_str().unwrap();
    assert!(text.contains(out_dir) && html.contains(out_dir));

    for id in &all_ids {
        for (name, body) in [
            ("raw message", &raw),
            ("text part", &text),
            ("html part", &html),
        ] {
            assert!(!body.contains(id.as_str()), "patient id {id} in the {name}");
        }
    }
    assert!(!raw.contains(PASSWORD));
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_password_is_recorded_and_the_run_still_succeeds() {
    let server = smtp_server("starttls").await;
    let env = env(SandboxOptions {
        patients: 2,
        ..SandboxOptions::default()
    })
    .await;
    let patients = env.sandbox.dataset().patient_ids();
    std::fs::write(env.path().join("smtp-password"), "not-the-password\n").unwrap();
    let notify = format!(
        "notify:\n  email:\n    host: 127.0.0.1\n    port: {}\n    caFile: {}\n    username: {USER}\n    passwordFile: smtp-password\n    from: {USER}\n    to: [team@example.org]\n",
        server.port,
        fixtures().join("ca.pem").display()
    );
    let config = env.write_config(&patients, ALL_SEARCHES, &format!("{FAST_LIMITS}{notify}"));
    let out = run(&config, &[]).await;
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let summary = summary_json(&env);
    assert_eq!(summary["outcome"], "success");
    let note = summary["notification"]["email"].as_str().unwrap();
    assert!(
        note.starts_with("failed: authentication failed") && note.contains("535"),
        "{note}"
    );
    assert!(stderr(&out).contains("notification e-mail not sent"));
    assert!(
        !stderr(&out).contains("attempt 1 of 3"),
        "authentication failures are not retried: {}",
        stderr(&out)
    );
    assert!(!server.maildir.path().join("1.eml").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn server_down_is_recorded_and_the_run_still_succeeds() {
    let env = env(SandboxOptions {
        patients: 2,
        ..SandboxOptions::default()
    })
    .await;
    let patients = env.sandbox.dataset().patient_ids();
    let port = free_port();
    let notify = format!(
        "notify:\n  email:\n    host: 127.0.0.1\n    port: {port}\n    tls: starttls\n    from: exports@example.org\n    to: [team@example.org]\n    timeoutSeconds: 5\n"
    );
    let config = env.write_config(&patients, ALL_SEARCHES, &format!("{FAST_LIMITS}{notify}"));
    let out = run(&config, &[]).await;
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let summary = summary_json(&env);
    assert_eq!(summary["outcome"], "success");
    let note = summary["notification"]["email"].as_str().unwrap();
    assert!(
        note.starts_with(&format!("failed: cannot connect to 127.0.0.1:{port}")),
        "{note}"
    );
    assert!(
        stderr(&out).contains("attempt 2 of 3"),
        "connection failures are retried: {}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_password_variable_is_named_at_send_time() {
    let env = env(SandboxOptions {
        patients: 1,
        ..SandboxOptions::default()
    })
    .await;
    let patients = env.sandbox.dataset().patient_ids();
    let notify = format!(
        "notify:\n  email:\n    host: 127.0.0.1\n    port: {}\n    username: u\n    passwordEnv: EPIC_EXPORT_TEST_UNSET_PASSWORD_VAR\n    from: exports@example.org\n    to: [team@example.org]\n",
        free_port()
    );
    let config = env.write_config(&patients, ALL_SEARCHES, &format!("{FAST_LIMITS}{notify}"));
    let out = run(&config, &[]).await;
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let note = summary_json(&env)["notification"]["email"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        note.contains("EPIC_EXPORT_TEST_UNSET_PASSWORD_VAR") && note.contains("not set"),
        "{note}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn implicit_tls_with_insecure_skip_verify_on_loopback() {
    let server = smtp_server("tls").await;
    let env = env(SandboxOptions {
        patients: 1,
        ..SandboxOptions::default()
    })
    .await;
    let patients = env.sandbox.dataset().patient_ids();
    let notify = format!(
        "notify:\n  email:\n    host: 127.0.0.1\n    port: {}\n    tls: tls\n    insecureSkipVerify: true\n    username: {USER}\n    passwordEnv: TEST_SMTP_PASSWORD\n    from: {USER}\n    to: [team@example.org]\n    on: [success]\n",
        server.port
    );
    let config = env.write_config(&patients, ALL_SEARCHES, &format!("{FAST_LIMITS}{notify}"));
    let out = run(&config, &[("TEST_SMTP_PASSWORD", PASSWORD)]).await;
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(
        summary_json(&env)["notification"]["email"],
        "sent to 1 recipient"
    );
    assert!(
        stderr(&out).contains("insecureSkipVerify"),
        "a warning is logged"
    );
    assert!(server.maildir.path().join("1.eml").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn outcome_not_in_on_sends_nothing() {
    let env = env(SandboxOptions {
        patients: 1,
        ..SandboxOptions::default()
    })
    .await;
    let patients = env.sandbox.dataset().patient_ids();
    let notify = format!(
        "notify:\n  email:\n    host: 127.0.0.1\n    port: {}\n    from: exports@example.org\n    to: [team@example.org]\n    on: [failure, partial]\n",
        free_port()
    );
    let config = env.write_config(&patients, ALL_SEARCHES, &format!("{FAST_LIMITS}{notify}"));
    let out = run(&config, &[]).await;
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert!(summary_json(&env).get("notification").is_none());
}

fn plan_error(notify: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), "x").unwrap();
    let yaml = format!(
        "name: t\nfhir:\n  baseUrl: https://fhir.example.org/R4\nauth:\n  clientId: c\n  privateKeyFile: k.pem\n\
         source:\n  search:\n    patients: [a1]\n    resources: [{{type: Condition}}]\n{notify}"
    );
    match epic_export::config::plan_from_text(&yaml, Path::new("config.yaml"), dir.path()) {
        Ok(_) => panic!("accepted: {notify}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn config_errors_name_the_field() {
    let base = "notify:\n  email:\n    from: me@example.org\n    to: [team@example.org]\n";
    let e = plan_error(&format!(
        "{base}    host: smtp.example.org\n    insecureSkipVerify: true\n"
    ));
    assert!(e.contains("notify.email.insecureSkipVerify"), "{e}");
    assert!(e.contains("loopback"), "{e}");
    let e = plan_error(
        "notify:\n  email:\n    host: 127.0.0.1\n    from: not an address\n    to: [team@example.org]\n",
    );
    assert!(e.contains("notify.email.from"), "{e}");
    let e = plan_error(
        "notify:\n  email:\n    host: 127.0.0.1\n    from: me@example.org\n    to: [team@]\n",
    );
    assert!(e.contains("notify.email.to"), "{e}");
    let e = plan_error(&format!("{base}    host: 127.0.0.1\n    on: [always]\n"));
    assert!(e.contains("notify.email.on"), "{e}");
    let e = plan_error(&format!("{base}    host: 127.0.0.1\n    tls: ssl\n"));
    assert!(e.contains("notify.email.tls"), "{e}");
    let e = plan_error(&format!("{base}    host: 127.0.0.1\n    username: u\n"));
    assert!(e.contains("notify.email.passwordEnv"), "{e}");
    let e = plan_error(&format!(
        "{base}    host: 127.0.0.1\n    caFile: missing.pem\n"
    ));
    assert!(e.contains("notify.email.caFile"), "{e}");
    // No password over plain text to a host that is not loopback.
    let e = plan_error(&format!(
        "{base}    host: smtp.example.org\n    tls: none\n    username: u\n    passwordEnv: P\n"
    ));
    assert!(
        e.contains("notify.email.tls") && e.contains("plain text"),
        "{e}"
    );
    // `sendOn`, the Kubernetes spelling, works here too.
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "name: t\nfhir:\n  baseUrl: https://fhir.example.org/R4\nauth:\n  clientId: c\n  privateKeyFile: k.pem\n\
         source:\n  search:\n    patients: [a1]\n    resources: [{{type: Condition}}]\n{base}    host: smtp.example.org\n    sendOn: [failure]\n"
    );
    let plan = epic_export::config::plan_from_text(&yaml, Path::new("c.yaml"), dir.path()).unwrap();
    assert!(!plan.email.unwrap().on.success);
}

#[test]
fn email_plan_defaults() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bridge.pem"), "x").unwrap();
    let yaml = "name: t\nfhir:\n  baseUrl: https://fhir.example.org/R4\nauth:\n  clientId: c\n  privateKeyFile: k.pem\n\
         source:\n  search:\n    patients: [a1]\n    resources: [{type: Condition}]\n\
         notify:\n  email:\n    host: 127.0.0.1\n    caFile: bridge.pem\n    username: u\n    passwordEnv: NOT_READ_AT_PARSE_TIME\n    from: me@example.org\n    to: [team@example.org]\n";
    let plan =
        epic_export::config::plan_from_text(yaml, Path::new("config.yaml"), dir.path()).unwrap();
    let email = plan.email.unwrap();
    assert_eq!(email.tls, epic_export::notify::TlsMode::Starttls);
    assert_eq!(email.port, 587);
    assert_eq!(email.timeout, Duration::from_secs(30));
    assert_eq!(email.on, epic_export::notify::OnSet::default());
    assert_eq!(
        email.ca.unwrap(),
        epic_export::notify::CaCert::File(dir.path().join("bridge.pem"))
    );
    assert_eq!(
        email.password,
        Some(epic_export::notify::PasswordSource::Env(
            "NOT_READ_AT_PARSE_TIME".into()
        ))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_that_fails_before_writing_still_reports_the_failure() {
    let server = smtp_server("starttls").await;
    let env = env(SandboxOptions {
        patients: 1,
        ..SandboxOptions::default()
    })
    .await;
    let patients = env.sandbox.dataset().patient_ids();
    let notify = format!(
        "notify:\n  email:\n    host: 127.0.0.1\n    port: {}\n    caFile: {}\n    username: {USER}\n    passwordEnv: TEST_SMTP_PASSWORD\n    from: {USER}\n    to: [team@example.org]\n    on: [failure]\n",
        server.port,
        fixtures().join("ca.pem").display()
    );
    let config = env.write_config(&patients, ALL_SEARCHES, &format!("{FAST_LIMITS}{notify}"));
    // An unregistered client id: the token request fails before anything is written.
    let yaml = std::fs::read_to_string(&config)
        .unwrap()
        .replace("clientId: test-client", "clientId: not-registered");
    std::fs::write(&config, yaml).unwrap();
    let out = run(&config, &[("TEST_SMTP_PASSWORD", PASSWORD)]).await;
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    let json = server.maildir.path().join("1.json");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !server.maildir.path().join("1.eml").exists() {
        assert!(std::time::Instant::now() < deadline, "no message arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let parsed: Value = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    assert_eq!(
        parsed["subject"],
        "[epic-export] test-export: failed — 0 records"
    );
    let text = parsed["parts"][0]["content"].as_str().unwrap();
    assert!(text.contains("nothing was written"), "{text}");
    assert!(text.contains("Errors (1):"), "{text}");
    assert!(!text.contains(&patients[0]));
}

/// ProtonMail Bridge makes its own certificate: RSA-2048, self-signed, `CA:true` with certSign,
/// naming only `0.0.0.0` (CN and IP SAN). tests/fixtures/smtp/bridge.pem is made the same way. With
/// that certificate in `caFile`, the message goes through (pinned: the server presents it itself);
/// a `caFile` that does not hold it is refused in the handshake, and so is the Bridge certificate as
/// a CA for a server that presents another one.
#[tokio::test(flavor = "multi_thread")]
async fn bridge_certificate_in_ca_file_is_pinned() {
    let bridge = smtp_server_with_cert("starttls", "bridge").await;
    let env = env(SandboxOptions {
        patients: 1,
        ..SandboxOptions::default()
    })
    .await;
    let patients = env.sandbox.dataset().patient_ids();
    let notify = |port: u16, ca: &str| {
        format!(
            "notify:\n  email:\n    host: 127.0.0.1\n    port: {port}\n    tls: starttls\n    caFile: {}\n    username: {USER}\n    passwordEnv: TEST_SMTP_PASSWORD\n    from: {USER}\n    to: [team@example.org]\n    timeoutSeconds: 10\n",
            fixtures().join(ca).display()
        )
    };
    let config = env.write_config(
        &patients,
        ALL_SEARCHES,
        &format!("{FAST_LIMITS}{}", notify(bridge.port, "bridge.pem")),
    );
    let out = run(&config, &[("TEST_SMTP_PASSWORD", PASSWORD)]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let record = summary_json(&env)["notification"]["email"].to_string();
    assert!(record.contains("sent to 1 recipient"), "{record}");
    assert!(bridge.maildir.path().join("1.eml").exists());

    // Another CA in caFile: the Bridge certificate is not trusted, nothing is sent.
    let config = env.write_config(
        &patients,
        ALL_SEARCHES,
        &format!("{FAST_LIMITS}{}", notify(bridge.port, "ca.pem")),
    );
    let out = run(&config, &[("TEST_SMTP_PASSWORD", PASSWORD)]).await;
    let record = summary_json(&env)["notification"]["email"].to_string();
    assert!(
        record.contains("TLS handshake") && record.contains("caFile"),
        "{record}"
    );
    assert!(!bridge.maildir.path().join("2.eml").exists());
    assert!(!stderr(&out).contains(PASSWORD));

    // The Bridge certificate pins only itself: a server presenting another certificate is refused.
    let other = smtp_server("starttls").await;
    let config = env.write_config(
        &patients,
        ALL_SEARCHES,
        &format!("{FAST_LIMITS}{}", notify(other.port, "bridge.pem")),
    );
    run(&config, &[("TEST_SMTP_PASSWORD", PASSWORD)]).await;
    let record = summary_json(&env)["notification"]["email"].to_string();
    assert!(record.contains("TLS handshake"), "{record}");
    assert!(!other.maildir.path().join("1.eml").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partial_runs_message_names_the_correlation_ids_of_its_failed_requests() {
    let server = smtp_server("starttls").await;
    let env = env(SandboxOptions {
        patients: 2,
        ..SandboxOptions::default()
    })
    .await;
    let patients = env.sandbox.dataset().patient_ids();
    env.sandbox.inject(epic_export::sandbox::Fault::Status {
        status: 403,
        retry_after: None,
    });
    let notify = format!(
        "notify:\n  email:\n    host: 127.0.0.1\n    port: {}\n    tls: starttls\n    caFile: {}\n    username: {USER}\n    passwordEnv: TEST_SMTP_PASSWORD\n    from: {USER}\n    to: [team@example.org]\n    on: [partial, failure]\n",
        server.port,
        fixtures().join("ca.pem").display()
    );
    let config = env.write_config(
        &patients,
        ALL_SEARCHES,
        &format!("limits:\n  concurrency: 1\n  requestsPerSecond: 0\n{notify}"),
    );
    let out = run(&config, &[("TEST_SMTP_PASSWORD", PASSWORD)]).await;
    assert_eq!(out.status.code(), Some(3), "stderr: {}", stderr(&out));
    let summary = summary_json(&env);
    let failed = summary["failedRequests"]
        .as_array()
        .expect("failedRequests");
    assert_eq!(failed.len(), 1, "{summary:#}");
    let id = failed[0]["correlation"]["x-request-id"].as_str().unwrap();
    assert!(id.starts_with("sandbox-"), "{id}");

    let json_path = server.maildir.path().join("1.json");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !json_path.exists() {
        assert!(std::time::Instant::now() < deadline, "no message arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let parsed: Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    for part in parsed["parts"].as_array().unwrap() {
        let content = part["content"].as_str().unwrap();
        assert!(
            content.contains(&format!("x-request-id: {id}")),
            "{} names the failed request's X-Request-Id:\n{content}",
            part["type"]
        );
        assert!(content.contains("HTTP 403"), "{content}");
        for p in &patients {
            assert!(!content.contains(p.as_str()), "patient id in the message");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_runs_message_names_the_correlation_id_of_the_refused_kick_off() {
    let server = smtp_server("starttls").await;
    let env = env(support::quick(SandboxOptions {
        patients: 2,
        ..SandboxOptions::default()
    }))
    .await;
    env.sandbox.inject(epic_export::sandbox::Fault::Status {
        status: 403,
        retry_after: None,
    });
    let notify = format!(
        "notify:\n  email:\n    host: 127.0.0.1\n    port: {}\n    tls: starttls\n    caFile: {}\n    username: {USER}\n    passwordEnv: TEST_SMTP_PASSWORD\n    from: {USER}\n    to: [team@example.org]\n",
        server.port,
        fixtures().join("ca.pem").display()
    );
    let config = env.write_bulk_config(&support::group_block(), &format!("{FAST_LIMITS}{notify}"));
    let out = run(&config, &[("TEST_SMTP_PASSWORD", PASSWORD)]).await;
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));

    let json_path = server.maildir.path().join("1.json");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !json_path.exists() {
        assert!(std::time::Instant::now() < deadline, "no message arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let parsed: Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert!(
        parsed["subject"].as_str().unwrap().contains("failed"),
        "{parsed:#}"
    );
    let text = parsed["parts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["type"] == "text/plain")
        .unwrap()["content"]
        .as_str()
        .unwrap()
        .to_owned();
    let line = text
        .lines()
        .find(|l| l.contains("$export"))
        .unwrap_or_else(|| panic!("the kick-off is named:\n{text}"));
    assert!(
        line.starts_with("- GET /api/FHIR/R4/Group/{id}/$export")
            && line.contains("HTTP 403")
            && line.contains("x-request-id: sandbox-"),
        "{line}"
    );
}
