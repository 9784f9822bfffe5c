//! Bulk Data mode end to end against the sandbox over real sockets: exact Group data, resume after a
//! kill, the kick-off throttle, token handling across origins and redirects, dropped connections, count
//! mismatches, terminal and transient poll errors, and `since: auto`.

mod support;

use std::time::Duration;

use epic_export::export::bulk::download;
use epic_export::sandbox::{Fault, SANDBOX_GROUP_ID, SandboxOptions};
use epic_export::summary::Outcome;
use serde_json::Value;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_export_lands_exactly_the_groups_data() {
    let env = env(quick(SandboxOptions {
        patients: 8,
        bulk_file_size: 40,
        ..SandboxOptions::default()
    }))
    .await;
    let config = env.write_bulk_config(&group_block(), FAST_LIMITS);
    let report = run_config(&config).await;
    assert_eq!(
        report.summary.outcome,
        Outcome::Success,
        "{:?}",
        report.summary.errors
    );

    let want = expected_all(env.sandbox.dataset(), &env.sandbox.dataset().patient_ids());
    assert_same_data(&read_run(&report.dir), &want);
    let bulk = report.summary.bulk.as_ref().unwrap();
    assert!(
        bulk.files_total > want.len() as u64,
        "several files for the big types were joined into one"
    );
    assert_eq!(bulk.files_failed, 0);

    // The server's error file lands in errors/, the manifest lists every file with its checksum.
    let outcomes =
        std::fs::read_to_string(report.dir.join("errors/OperationOutcome.ndjson")).unwrap();
    assert!(
        outcomes.lines().count() >= 1 && outcomes.lines().all(|l| l.contains("OperationOutcome"))
    );
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(report.dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["output"].as_array().unwrap().len(), want.len());
    assert!(
        manifest["request"]
            .as_str()
            .unwrap()
            .contains(&format!("Group/{SANDBOX_GROUP_ID}/$export"))
    );
    assert!(!report.dir.join("bulk-status.json").exists() && !report.dir.join(".parts").exists());

    let stats = env.sandbox.stats();
    assert_eq!(stats.bulk_kickoffs, 1);
    assert_eq!(stats.bulk_deletes, 1, "DELETE after a complete download");
    assert!(env.export_dir().join(".last-success.json").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_run_resumes_the_same_export() {
    let env = env(SandboxOptions {
        patients: 3,
        bulk_delay: Duration::from_secs(4),
        bulk_throttle: Duration::from_secs(3600),
        ..SandboxOptions::default()
    })
    .await;
    let config = env.write_bulk_config(&group_block(), FAST_LIMITS);
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_epic-export"))
        .args(["run", "--no-progress", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let saved = std::fs::read_dir(env.export_dir())
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.path().join("bulk-status.json").exists());
        if saved && env.sandbox.stats().bulk_polls > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the run never saved its status URL"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().await.unwrap();

    // Same config again: no second kick-off (the throttle would refuse it), the export is resumed.
    let report = run_config(&config).await;
    assert_eq!(
        report.summary.outcome,
        Outcome::Success,
        "{:?}",
        report.summary.errors
    );
    assert!(report.summary.bulk.as_ref().unwrap().resumed);
    assert_eq!(env.sandbox.stats().bulk_kickoffs, 1);
    let want = expected_all(env.sandbox.dataset(), &env.sandbox.dataset().patient_ids());
    assert_same_data(&read_run(&report.dir), &want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kickoff_throttle_becomes_a_cooldown_not_a_loop() {
    let env = env(SandboxOptions {
        patients: 2,
        bulk_delay: Duration::from_millis(100),
        bulk_throttle: Duration::from_secs(3600),
        ..SandboxOptions::default()
    })
    .await;
    let config = env.write_bulk_config(&group_block(), FAST_LIMITS);
    assert_eq!(run_config(&config).await.summary.outcome, Outcome::Success);

    let second = run_config(&config).await;
    assert_eq!(second.summary.outcome, Outcome::Failed);
    let text = second.summary.errors.join("\n");
    assert!(
        text.contains("too recently") && text.contains("next kick-off is allowed after"),
        "{text}"
    );
    assert_eq!(env.sandbox.stats().bulk_kickoffs, 2);
    assert!(
        std::fs::read_link(env.export_dir().join("latest")).is_ok(),
        "the good run stays the latest"
    );

    // The third run does not even ask.
    let third = run_config(&config).await;
    assert_eq!(third.summary.outcome, Outcome::Failed);
    assert!(
        third.summary.errors.join("\n").contains("not kicking off"),
        "{:?}",
        third.summary.errors
    );
    assert_eq!(env.sandbox.stats().bulk_kickoffs, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_to_storage_never_carry_the_token() {
    let env = env(quick(SandboxOptions {
        patients: 3,
        ..SandboxOptions::default()
    }))
    .await;
    for _ in 0..3 {
        env.sandbox.inject(Fault::RedirectDownload);
    }
    let config = env.write_bulk_config(&group_block(), FAST_LIMITS);
    let report = run_config(&config).await;
    assert_eq!(
        report.summary.outcome,
        Outcome::Success,
        "{:?}",
        report.summary.errors
    );
    let stats = env.sandbox.stats();
    assert!(stats.storage_requests >= 3, "{stats:?}");
    assert_eq!(stats.storage_requests_with_authorization, 0);
    assert_same_data(
        &read_run(&report.dir),
        &expected_all(env.sandbox.dataset(), &env.sandbox.dataset().patient_ids()),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_on_another_host_need_the_allow_list_and_never_get_the_token() {
    let env = env(quick(SandboxOptions {
        patients: 2,
        bulk_files_on_storage: true,
        ..SandboxOptions::default()
    }))
    .await;
    let config = env.write_bulk_config(&group_block(), FAST_LIMITS);
    let refused = run_config(&config).await;
    assert_eq!(refused.summary.outcome, Outcome::Partial);
    assert!(
        refused
            .summary
            .errors
            .iter()
            .any(|e| e.contains("fileHosts")),
        "{:?}",
        refused.summary.errors
    );
    assert_eq!(
        env.sandbox.stats().storage_requests,
        0,
        "nothing fetched from a host that is not allowed"
    );

    let allowed = format!(
        "{}    fileHosts: [\"{}\"]\n",
        group_block(),
        env.sandbox.storage_origin()
    );
    let config = env.write_bulk_config(&allowed, FAST_LIMITS);
    let report = run_config(&config).await;
    assert_eq!(
        report.summary.outcome,
        Outcome::Success,
        "{:?}",
        report.summary.errors
    );
    let stats = env.sandbox.stats();
    assert!(stats.storage_requests > 0);
    assert_eq!(stats.storage_requests_with_authorization, 0);
    assert_same_data(
        &read_run(&report.dir),
        &expected_all(env.sandbox.dataset(), &env.sandbox.dataset().patient_ids()),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_mid_file_recovers_with_exact_content() {
    let env = env(quick(SandboxOptions {
        patients: 6,
        ..SandboxOptions::default()
    }))
    .await;
    env.sandbox
        .inject(Fault::DropDownload { after_bytes: 3000 });
    env.sandbox.inject(Fault::DropDownload { after_bytes: 10 });
    let config = env.write_bulk_config(
        &group_block(),
        "limits:\n  concurrency: 1\n  requestsPerSecond: 0\n",
    );
    let report = run_config(&config).await;
    assert_eq!(
        report.summary.outcome,
        Outcome::Success,
        "{:?}",
        report.summary.errors
    );
    assert!(report.summary.retries >= 2);
    assert_same_data(
        &read_run(&report.dir),
        &expected_all(env.sandbox.dataset(), &env.sandbox.dataset().patient_ids()),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_count_mismatch_is_reported() {
    let env = env(quick(SandboxOptions {
        patients: 2,
        ..SandboxOptions::default()
    }))
    .await;
    env.sandbox.inject(Fault::WrongCount);
    let config = env.write_bulk_config(&group_block(), FAST_LIMITS);
    let report = run_config(&config).await;
    assert_eq!(report.summary.outcome, Outcome::Partial);
    assert!(
        report
            .summary
            .errors
            .iter()
            .any(|e| e.contains("manifest says")),
        "{:?}",
        report.summary.errors
    );
    assert_eq!(
        env.sandbox.stats().bulk_deletes,
        0,
        "an incomplete export is not deleted at the server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_poll_errors_keep_polling_and_terminal_ones_fail() {
    let env = env(quick(SandboxOptions {
        patients: 2,
        ..SandboxOptions::default()
    }))
    .await;
    env.sandbox.inject(Fault::PollOutcome {
        status: 503,
        code: "transient".into(),
    });
    let config = env.write_bulk_config(&group_block(), FAST_LIMITS);
    let report = run_config(&config).await;
    assert_eq!(
        report.summary.outcome,
        Outcome::Success,
        "{:?}",
        report.summary.errors
    );

    env.sandbox.inject(Fault::PollOutcome {
        status: 500,
        code: "processing".into(),
    });
    let report = run_config(&config).await;
    assert_eq!(report.summary.outcome, Outcome::Failed);
    let text = report.summary.errors.join("\n");
    assert!(
        text.contains("export failed") && text.contains("HTTP 500"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_auto_sends_the_previous_transaction_time() {
    let env = env(quick(SandboxOptions {
        patients: 3,
        ..SandboxOptions::default()
    }))
    .await;
    let config = env.write_bulk_config(&format!("{}    since: auto\n", group_block()), FAST_LIMITS);
    let first = run_config(&config).await;
    assert_eq!(first.summary.outcome, Outcome::Success);
    assert!(
        first.summary.bulk.as_ref().unwrap().since.is_none(),
        "nothing to start from on the first run"
    );
    let t1 = first
        .summary
        .bulk
        .as_ref()
        .unwrap()
        .transaction_time
        .clone()
        .unwrap();

    let second = run_config(&config).await;
    assert_eq!(
        second.summary.outcome,
        Outcome::Success,
        "{:?}",
        second.summary.errors
    );
    assert_eq!(
        second.summary.bulk.as_ref().unwrap().since.as_deref(),
        Some(t1.as_str())
    );
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(second.dir.join("manifest.json")).unwrap()).unwrap();
    let request = manifest["request"].as_str().unwrap();
    let sent: String = url::form_urlencoded::parse(request.split_once('?').unwrap().1.as_bytes())
        .find(|(k, _)| k == "_since")
        .map(|(_, v)| v.into_owned())
        .unwrap();
    assert_eq!(sent, t1, "the server received the previous transactionTime");
    assert!(
        second.summary.records_total < first.summary.records_total,
        "only what changed since"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_kickoff_is_retried_and_a_bad_one_quotes_the_server() {
    let env = env(quick(SandboxOptions {
        patients: 2,
        ..SandboxOptions::default()
    }))
    .await;
    env.sandbox.inject(Fault::Status {
        status: 503,
        retry_after: None,
    });
    let config = env.write_bulk_config(&group_block(), FAST_LIMITS);
    let report = run_config(&config).await;
    assert_eq!(
        report.summary.outcome,
        Outcome::Success,
        "{:?}",
        report.summary.errors
    );
    assert_eq!(env.sandbox.stats().bulk_kickoffs, 1);

    // An unknown group: the server's OperationOutcome is quoted.
    let config = env.write_bulk_config("    group: no-such-group\n", FAST_LIMITS);
    let report = run_config(&config).await;
    assert_eq!(report.summary.outcome, Outcome::Failed);
    let text = report.summary.errors.join("\n");
    assert!(text.contains("refused the kick-off (HTTP 404)"), "{text}");
}

/// A file server without range support: the first answer is cut off after `cut` bytes, later answers
/// send `second` whole.
async fn flaky_file_server(first: Vec<u8>, cut: usize, second: Vec<u8>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/file.ndjson", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let mut n = 0;
        while let Ok((mut sock, _)) = listener.accept().await {
            let mut buf = vec![0u8; 4096];
            let _ = sock.read(&mut buf).await;
            let body = if n == 0 { &first } else { &second };
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/fhir+ndjson\r\ncontent-length: {}\r\nx-request-id: file-{n}\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock
                .write_all(if n == 0 { &body[..cut] } else { body })
                .await;
            let _ = sock.shutdown().await;
            n += 1;
        }
    });
    url
}

/// A Condition file downloaded by `fetch_file`.
struct Fetched {
    result: Result<(u64, u64), download::DownloadError>,
    /// The lines handed to the writer.
    written: Vec<u8>,
    /// The run log's lines.
    log: Vec<Value>,
    /// The requests the summary would list as failed.
    failed: usize,
}

async fn fetch_file(env: &Env, url: String) -> Fetched {
    use epic_export::export::bulk::manifest;
    use epic_export::export::writer::WriterMsg;
    let key = epic_export::auth::SigningKey::load(&env.path().join("keys/private.pem"), None, None)
        .unwrap();
    let tokens = std::sync::Arc::new(epic_export::auth::TokenSource::new(
        http_client(Duration::from_secs(5)),
        epic_export::auth::TokenSourceConfig {
            client_id: CLIENT_ID.into(),
            token_url: env.sandbox.token_url(),
            scope: "system/*.read".into(),
            key,
            jku: None,
        },
    ));
    let limits = epic_export::fhir::Limits {
        concurrency: 1,
        requests_per_second: None,
        retry: epic_export::http::retry::RetryPolicy {
            max_attempts: 3,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_secs(1),
        },
        request_timeout: Duration::from_secs(5),
    };
    let client =
        epic_export::fhir::FhirClient::new(&env.sandbox.base_url(), tokens, limits).unwrap();
    let d = manifest::Download {
        kind: manifest::Kind::Output,
        file: manifest::FileRef {
            resource_type: "Condition".into(),
            url,
            count: None,
        },
        token_origins: vec![],
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let collect = tokio::spawn(async move {
        let mut all = Vec::new();
        while let Some(msg) = rx.recv().await {
            if let WriterMsg::Resources { lines, .. } = msg {
                all.extend_from_slice(&lines);
            }
        }
        all
    });
    let log_dir = tempfile::tempdir().unwrap();
    client.log.start(log_dir.path()).unwrap();
    let result = download::download(&client, &d, &tx).await;
    drop(tx);
    let log = client.log.finish().unwrap();
    Fetched {
        result,
        written: collect.await.unwrap(),
        log: check_run_log(log.parent().unwrap(), &[]),
        failed: client.failed_requests().len(),
    }
}

fn conditions(n: usize, tag: &str) -> Vec<u8> {
    (0..n)
        .map(|i| format!("{{\"resourceType\":\"Condition\",\"id\":\"c{i}\",\"note\":\"{tag}\"}}\n"))
        .collect::<String>()
        .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refetched_file_without_ranges_skips_what_was_written_and_checks_it() {
    let env = env(SandboxOptions::default()).await;
    let body = conditions(2000, "same");
    let cut = body.len() / 2 + 7;
    let url = flaky_file_server(body.clone(), cut, body.clone()).await;
    let Fetched {
        result,
        written,
        log,
        failed,
    } = fetch_file(&env, url).await;
    assert_eq!(result.unwrap().0, 2000);
    assert_eq!(written, body, "every line exactly once, in order");
    // The run log has both requests, each with the bytes its body really had; the cut one is not a
    // failed request of the run, since it was requested again.
    assert_eq!(log.len(), 2, "{log:#?}");
    assert_eq!(failed, 0);
    assert_eq!(log[0]["bytes"], cut as u64, "{log:#?}");
    assert!(log[0]["error"].is_string(), "{log:#?}");
    assert_eq!(log[0]["correlation"]["x-request-id"], "file-0");
    assert_eq!(log[1]["bytes"], body.len() as u64, "{log:#?}");
    assert!(log[1].get("error").is_none(), "{log:#?}");

    // The server changes the file between the two answers: refused, never mixed.
    let url = flaky_file_server(conditions(2000, "first"), 50_000, conditions(2000, "other")).await;
    let result = fetch_file(&env, url).await.result;
    assert!(result.unwrap_err().message.contains("different content"));

    // A line that is not JSON, or of another type, fails the file and names the line; the failure
    // and the run log's line carry the answer's correlation id.
    let mut bad = conditions(3, "x");
    bad.extend_from_slice(b"{\"resourceType\":\"Patient\",\"id\":\"p\"}\n");
    let url = flaky_file_server(bad.clone(), bad.len(), bad).await;
    let Fetched {
        result,
        log,
        failed,
        ..
    } = fetch_file(&env, url).await;
    let err = result.unwrap_err();
    assert!(
        err.message.contains("line 4") && err.message.contains("expected Condition"),
        "{err:?}"
    );
    assert_eq!(err.correlation["x-request-id"], "file-0", "{err:?}");
    assert_eq!(log.len(), 1, "{log:#?}");
    assert!(
        log[0]["error"].as_str().unwrap().contains("line 4"),
        "{log:#?}"
    );
    assert_eq!(failed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn giving_up_the_wait_leaves_the_export_for_the_next_run() {
    let env = env(SandboxOptions {
        patients: 2,
        bulk_delay: Duration::from_secs(4),
        bulk_throttle: Duration::from_secs(3600),
        ..SandboxOptions::default()
    })
    .await;
    let config = env.write_bulk_config(
        &format!("{}    maxWaitHours: 0.0003\n", group_block()),
        FAST_LIMITS,
    );
    let out = run_binary(&config).await;
    assert_eq!(
        out.status.code(),
        Some(4),
        "unfinished: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("maxWaitHours") && stderr.contains("resumes"),
        "{stderr}"
    );

    let config = env.write_bulk_config(&group_block(), FAST_LIMITS);
    let report = run_config(&config).await;
    assert_eq!(
        report.summary.outcome,
        Outcome::Success,
        "{:?}",
        report.summary.errors
    );
    assert!(report.summary.bulk.as_ref().unwrap().resumed);
    assert_eq!(env.sandbox.stats().bulk_kickoffs, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_log_has_the_kick_off_the_polls_and_every_file() {
    let env = env(quick(SandboxOptions {
        patients: 4,
        bulk_file_size: 40,
        ..SandboxOptions::default()
    }))
    .await;
    let config = env.write_bulk_config(&group_block(), FAST_LIMITS);
    let report = run_config(&config).await;
    assert_eq!(
        report.summary.outcome,
        Outcome::Success,
        "{:?}",
        report.summary.errors
    );
    let lines = check_run_log(&report.dir, &env.sandbox.dataset().patient_ids());
    let of = |e: &str| -> Vec<&Value> { lines.iter().filter(|l| l["event"] == e).collect() };
    let kickoff = of("kickoff");
    assert_eq!(kickoff.len(), 1);
    assert_eq!(kickoff[0]["status"], 202);
    assert!(
        kickoff[0]["path"]
            .as_str()
            .unwrap()
            .starts_with("/api/FHIR/R4/Group/{id}/$export"),
        "{kickoff:?}"
    );
    let polls = of("status");
    assert!(!polls.is_empty());
    assert!(
        polls
            .iter()
            .any(|p| p["status"] == 202 && p["progress"].is_string()),
        "X-Progress of the polls: {polls:?}"
    );
    assert_eq!(polls.last().unwrap()["status"], 200);
    let downloads = of("download");
    let bulk = report.summary.bulk.as_ref().unwrap();
    assert_eq!(downloads.len() as u64, bulk.files_total, "{downloads:?}");
    assert!(
        downloads
            .iter()
            .all(|d| d["status"] == 200 && d["path"].as_str().unwrap().ends_with("{file}"))
    );
    // Each line has the body's size, read to its end: together, the bytes of the files written
    // (resources, and the server's OperationOutcomes under errors/).
    let logged: u64 = downloads.iter().map(|d| d["bytes"].as_u64().unwrap()).sum();
    let outcomes = std::fs::metadata(report.dir.join("errors/OperationOutcome.ndjson")).unwrap();
    let written: u64 = report
        .summary
        .resources
        .iter()
        .map(|r| r.bytes)
        .sum::<u64>()
        + outcomes.len();
    assert_eq!(logged, written, "{downloads:?}");
    assert!(
        lines
            .iter()
            .all(|l| l["correlation"]["x-request-id"].is_string()),
        "every answer's X-Request-Id"
    );
    assert!(report.summary.failed_requests.is_empty());
}
