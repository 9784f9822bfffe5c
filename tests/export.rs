//! Search-mode export end to end against the sandbox over real sockets: exact data, paging, outcomes,
//! retries, foreign-origin links, partial runs, killed runs, and the run folder's contract.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use epic_export::export::{RunOptions, run};
use epic_export::sandbox::{Fault, SandboxOptions};
use epic_export::summary::Outcome;
use serde_json::Value;
use support::*;

fn summary(run_dir: &std::path::Path) -> Value {
    serde_json::from_slice(&std::fs::read(run_dir.join("summary.json")).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_exactly_the_sandbox_data() {
    // Small pages force many pages, including short pages that are not the last.
    let env = env(SandboxOptions {
        patients: 12,
        page_size: 4,
        ..SandboxOptions::default()
    })
    .await;
    let patients = env.sandbox.dataset().patient_ids();
    let config = env.write_config(&patients, ALL_SEARCHES, FAST_LIMITS);
    let plan = epic_export::config::load_plan(&config).unwrap();
    let report = run(&plan, &RunOptions::default()).await.unwrap();
    assert_eq!(
        report.summary.outcome,
        Outcome::Success,
        "{:?}",
        report.summary.errors
    );

    let want = expected(env.sandbox.dataset(), &patients);
    let got = read_run(&report.dir);
    assert_same_data(&got, &want);
    assert!(want["Observation"].len() > 50);
    assert!(
        report.summary.search.as_ref().unwrap().duplicates_skipped > 0,
        "observations in two categories are written once"
    );

    // Outcome entries go to errors/, not the data.
    let outcomes_expected: usize = patients
        .iter()
        .map(|p| {
            ["Condition", "DocumentReference"]
                .iter()
                .filter(|t| env.sandbox.dataset().search_has_outcome(t, p))
                .count()
        })
        .sum();
    let outcomes =
        std::fs::read_to_string(report.dir.join("errors/OperationOutcome.ndjson")).unwrap();
    assert_eq!(outcomes.lines().count(), outcomes_expected);
    assert!(outcomes.lines().all(|l| l.contains("\"OperationOutcome\"")));

    // Manifest: counts, bytes and checksums of the files as written.
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(report.dir.join("manifest.json")).unwrap()).unwrap();
    let outputs = manifest["output"].as_array().unwrap();
    assert_eq!(outputs.len(), want.len());
    for o in outputs {
        let file = report.dir.join(o["url"].as_str().unwrap());
        let bytes = std::fs::read(&file).unwrap();
        assert_eq!(o["bytes"].as_u64().unwrap(), bytes.len() as u64);
        assert_eq!(
            o["count"].as_u64().unwrap() as usize,
            want[o["type"].as_str().unwrap()].len()
        );
        let sha: String = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes)
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(o["sha256"], sha);
    }
    assert!(manifest["transactionTime"].as_str().unwrap().ends_with('Z'));
    assert_eq!(manifest["error"][0]["type"], "OperationOutcome");

    // Summary, latest link, permissions.
    let s = summary(&report.dir);
    assert_eq!(s["outcome"], "success");
    assert_eq!(
        s["recordsTotal"].as_u64().unwrap() as usize,
        want.values().map(|m| m.len()).sum::<usize>()
    );
    let latest = std::fs::read_link(env.export_dir().join("latest")).unwrap();
    assert_eq!(env.export_dir().join(latest), report.dir);
    assert_eq!(
        std::fs::metadata(&report.dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert_eq!(
        std::fs::metadata(report.dir.join("Patient.ndjson"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(report.dir.join("summary.json"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_429_in_both_forms_and_503_without_loss_or_duplicates() {
    let env = env(SandboxOptions {
        patients: 4,
        page_size: 5,
        ..SandboxOptions::default()
    })
    .await;
    let patients = env.sandbox.dataset().patient_ids();
    let soon = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(1));
    env.sandbox.inject(Fault::Status {
        status: 429,
        retry_after: Some("1".into()),
    });
    env.sandbox.inject(Fault::Status {
        status: 503,
        retry_after: None,
    });
    env.sandbox.inject(Fault::Status {
        status: 429,
        retry_after: Some(soon),
    });
    env.sandbox.inject(Fault::Status {
        status: 502,
        retry_after: None,
    });
    let config = env.write_config(
        &patients,
        ALL_SEARCHES,
        "limits:\n  concurrency: 1\n  requestsPerSecond: 0\n",
    );
    let plan = epic_export::config::load_plan(&config).unwrap();
    let started = std::time::Instant::now();
    let report = run(&plan, &RunOptions::default()).await.unwrap();
    assert_eq!(
        report.summary.outcome,
        Outcome::Success,
        "{:?}",
        report.summary.errors
    );
    assert_eq!(report.summary.retries, 4);
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "Retry-After was honoured"
    );
    assert_same_data(
        &read_run(&report.dir),
        &expected(env.sandbox.dataset(), &patients),
    );
    assert_eq!(env.sandbox.stats().injected_faults, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_faults_at_scale_still_give_exact_data() {
    let env = env(SandboxOptions {
        patients: 20,
        page_size: 6,
        rate_429: 0.05,
        rate_5xx: 0.05,
        seed: 7,
        ..SandboxOptions::default()
    })
    .await;
    let patients = env.sandbox.dataset().patient_ids();
    // Retry-After: 1 on every 429 would make this slow; the client caps waits by its policy anyway.
    let config = env.write_config(
        &patients,
        ALL_SEARCHES,
        "limits:\n  concurrency: 8\n  requestsPerSecond: 0\n  maxAttempts: 10\n",
    );
    let plan = epic_export::config::load_plan(&config).unwrap();
    let report = run(&plan, &RunOptions::default()).await.unwrap();
    assert_eq!(
        report.summary.outcome,
        Outcome::Success,
        "{:?}",
        report.summary.errors
    );
    assert!(env.sandbox.stats().random_faults > 5);
    assert_same_data(
        &read_run(&report.dir),
        &expected(env.sandbox.dataset(), &patients),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_origin_next_link_never_gets_the_token() {
    // A second listener stands in for another host; it records whatever reaches it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let foreign = format!("http://{}", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(tokio::sync::Mutex::new(Vec::<String>::new()));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut buf = vec![0u8; 8192];
            let n = sock.read(&mut buf).await.unwrap_or(0);
            seen2
                .lock()
                .await
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            let _ = sock
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                .await;
        }
    });

    let env = env(SandboxOptions {
        patients: 20,
        page_size: 3,
        ..SandboxOptions::default()
    })
    .await;
    let patients = env.sandbox.dataset().patient_ids();
    env.sandbox.inject(Fault::ForeignNextLink {
        origin: foreign.clone(),
    });
    // A patient whose Conditions fit on one page (no next link to move) and whose lab Observations
    // need several, so the fault lands on the Observation search whatever order the searches run in.
    let patient: Vec<String> = patients
        .iter()
        .filter(|p| {
            let want = expected(env.sandbox.dataset(), &[p.to_string()]);
            let conditions = want.get("Condition").map_or(0, |c| c.len());
            let labs = env.sandbox.dataset().resources("Observation", p).len();
            (1..=3).contains(&conditions) && labs > 6
        })
        .take(1)
        .cloned()
        .collect();
    assert_eq!(patient.len(), 1, "the sandbox data has such a patient");
    let config = env.write_config(
        &patient,
        "resource_type,search_params\nObservation,category=laboratory\nCondition,\n",
        FAST_LIMITS,
    );
    let plan = epic_export::config::load_plan(&config).unwrap();
    let report = run(&plan, &RunOptions::default()).await.unwrap();

    assert_eq!(report.summary.outcome, Outcome::Partial);
    assert_eq!(report.summary.search.as_ref().unwrap().searches_failed, 1);
    let failures =
        std::fs::read_to_string(report.dir.join("errors/failed-requests.ndjson")).unwrap();
    assert!(failures.contains("another origin"), "{failures}");
    assert!(failures.contains("Observation?category=laboratory"));
    let requests = seen.lock().await;
    assert!(
        requests
            .iter()
            .all(|r| !r.to_ascii_lowercase().contains("authorization")),
        "the token went to {foreign}"
    );
    assert!(requests.is_empty(), "the link was not followed at all");
    // The other search still completed.
    let got = read_run(&report.dir);
    assert_eq!(
        got["Condition"].len(),
        expected(env.sandbox.dataset(), &patient)["Condition"].len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4xx_fails_only_that_search_and_the_run_is_partial() {
    let env = env(SandboxOptions {
        patients: 3,
        ..SandboxOptions::default()
    })
    .await;
    let patients = env.sandbox.dataset().patient_ids();
    env.sandbox.inject(Fault::Status {
        status: 403,
        retry_after: None,
    });
    let config = env.write_config(
        &patients,
        ALL_SEARCHES,
        "limits:\n  concurrency: 1\n  requestsPerSecond: 0\n",
    );
    let out = run_binary(&config).await;
    assert_eq!(
        out.status.code(),
        Some(3),
        "partial has its own exit code; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("PARTIAL"), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("failed request: GET /api/FHIR/R4/")
                && l.contains("{id}")
                && l.contains("x-request-id: sandbox-")),
        "the terminal names the failed request and its X-Request-Id: {stdout}"
    );
    let latest = env.export_dir().join("latest");
    let s = summary(&latest);
    assert_eq!(s["outcome"], "partial");
    assert_eq!(s["search"]["searchesFailed"], 1);
    assert_eq!(s["search"]["patientsWithErrors"], 1);
    let failures = std::fs::read_to_string(latest.join("errors/failed-requests.ndjson")).unwrap();
    let f: Value = serde_json::from_str(failures.lines().next().unwrap()).unwrap();
    assert_eq!(f["status"], 403);
    assert_eq!(f["patient"], patients[0].as_str());

    // PHI hygiene: the process's logs name no patient.
    let stderr = String::from_utf8_lossy(&out.stderr);
    for p in &patients {
        assert!(
            !stderr.contains(p.as_str()) && !stdout.contains(p.as_str()),
            "patient id in logs:\n{stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_run_leaves_nothing_published_and_the_next_run_is_fine() {
    let env = env(SandboxOptions {
        patients: 30,
        latency: Duration::from_millis(40),
        ..SandboxOptions::default()
    })
    .await;
    let patients = env.sandbox.dataset().patient_ids();
    let config = env.write_config(
        &patients,
        ALL_SEARCHES,
        "limits:\n  concurrency: 2\n  requestsPerSecond: 0\n",
    );
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_epic-export"))
        .args(["run", "--no-progress", "--config"])
        .arg(&config)
        .stderr(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until it is writing data, then kill it hard.
    let export_dir = env.export_dir();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let writing = std::fs::read_dir(&export_dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                let name = e.file_name().into_string().unwrap();
                name.ends_with(".partial") && e.path().join("Patient.ndjson").exists()
            });
        if writing {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the run never started writing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().await.unwrap();
    let names: Vec<String> = std::fs::read_dir(&export_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    assert!(!names.iter().any(|n| n == "latest"), "{names:?}");
    assert!(
        names.iter().all(|n| n.starts_with('.')),
        "only hidden leftovers: {names:?}"
    );

    // The next run completes, and sweeps the leftover.
    let plan = epic_export::config::load_plan(&config).unwrap();
    let report = run(&plan, &RunOptions::default()).await.unwrap();
    assert_eq!(report.summary.outcome, Outcome::Success);
    assert_same_data(
        &read_run(&report.dir),
        &expected(env.sandbox.dataset(), &patients),
    );
    let names: Vec<String> = std::fs::read_dir(&export_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    assert!(!names.iter().any(|n| n.ends_with(".partial")), "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_runs_removes_old_runs() {
    let env = env(SandboxOptions {
        patients: 1,
        ..SandboxOptions::default()
    })
    .await;
    let patients = env.sandbox.dataset().patient_ids();
    let config = env.write_config(&patients, "resource_type\nPatient\n", "  keepRuns: 2\n");
    // keepRuns is under output:, which write_config ends with.
    let plan = epic_export::config::load_plan(&config).unwrap();
    assert_eq!(plan.keep_runs, 2);
    let mut dirs = Vec::new();
    for _ in 0..3 {
        dirs.push(run(&plan, &RunOptions::default()).await.unwrap().dir);
    }
    assert!(!dirs[0].exists());
    assert!(dirs[1].exists() && dirs[2].exists());
    assert_ne!(dirs[1], dirs[2], "runs in the same second get distinct ids");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auth_failure_is_fatal_and_writes_nothing() {
    let env = env(SandboxOptions {
        patients: 1,
        ..SandboxOptions::default()
    })
    .await;
    let patients = env.sandbox.dataset().patient_ids();
    let config = env.write_config(&patients, "resource_type\nPatient\n", "");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(CLIENT_ID, "someone-else");
    std::fs::write(&config, text).unwrap();
    let out = run_binary(&config).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("invalid_client") && stderr.contains("aud") && stderr.contains("kid"),
        "{stderr}"
    );
    assert!(
        !env.export_dir().exists() || std::fs::read_dir(env.export_dir()).unwrap().count() == 0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_log_has_every_request_and_no_patient_id_and_failed_ones_reach_the_summary() {
    let env = env(SandboxOptions {
        patients: 3,
        page_size: 4,
        ..SandboxOptions::default()
    })
    .await;
    let patients = env.sandbox.dataset().patient_ids();
    // One search is refused: the run is partial, and the summary names the request with the
    // server's X-Request-Id.
    env.sandbox.inject(Fault::Status {
        status: 403,
        retry_after: None,
    });
    let config = env.write_config(
        &patients,
        ALL_SEARCHES,
        "limits:\n  concurrency: 1\n  requestsPerSecond: 0\n",
    );
    let plan = epic_export::config::load_plan(&config).unwrap();
    let report = run(&plan, &RunOptions::default()).await.unwrap();
    assert_eq!(report.summary.outcome, Outcome::Partial);

    let lines = check_run_log(&report.dir, &patients);
    let token: Vec<&Value> = lines.iter().filter(|l| l["event"] == "token").collect();
    assert_eq!(token.len(), 1, "the run's one token request: {lines:#?}");
    assert_eq!(token[0]["status"], 200);
    assert_eq!(token[0]["method"], "POST");
    assert_eq!(
        lines[0], *token[0],
        "written first, once the run had a folder"
    );
    let pages = lines.iter().filter(|l| l["event"] == "page").count();
    assert_eq!(
        pages as u64, report.summary.requests,
        "one line per request (no retries here)"
    );
    assert_eq!(pages + 1, lines.len());
    assert!(
        lines.iter().all(|l| l["correlation"]["x-request-id"]
            .as_str()
            .is_some_and(|id| id.starts_with("sandbox-"))),
        "the sandbox's X-Request-Id is in every line"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["path"].as_str().unwrap().contains("?patient={id}")),
        "{lines:#?}"
    );
    let refused: Vec<&Value> = lines.iter().filter(|l| l["status"] == 403).collect();
    assert_eq!(refused.len(), 1);
    assert_eq!(
        refused[0]["error"],
        "HTTP 403 (OperationOutcome: processing)"
    );

    // The summary carries the failed request and its correlation id; the manifest does not list the log.
    let s = summary(&report.dir);
    let failed = s["failedRequests"].as_array().expect("failedRequests");
    assert_eq!(failed.len(), 1, "{s:#}");
    assert_eq!(failed[0]["status"], 403);
    assert_eq!(
        failed[0]["correlation"]["x-request-id"],
        refused[0]["correlation"]["x-request-id"]
    );
    // So does the search's record in errors/.
    let failures =
        std::fs::read_to_string(report.dir.join("errors/failed-requests.ndjson")).unwrap();
    let record: Value = serde_json::from_str(failures.lines().next().unwrap()).unwrap();
    assert_eq!(
        record["correlation"]["x-request-id"],
        refused[0]["correlation"]["x-request-id"]
    );
    let manifest = std::fs::read_to_string(report.dir.join("manifest.json")).unwrap();
    assert!(!manifest.contains("log.ndjson"));
    let mode = std::fs::metadata(report.dir.join("log.ndjson"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}
