//! Clinical notes and referenced resources against the sandbox (Epic's shapes: a note's HTML and RTF
//! from one `Binary`, scanned PDFs, reports' `presentedForm`, `medicationReference` to a shared
//! catalogue): every referenced document exactly once and byte-equal, the resources as the server sent
//! them apart from the links, hydration by `_id` batches, a killed bulk run resuming without
//! downloading again, and documents on a file host without the token. `tests/attachments.rs` checks
//! each rule against an independent server.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use aws_lc_rs::digest;
use epic_export::sandbox::{Dataset, SandboxOptions};
use epic_export::summary::Outcome;
use serde_json::Value;
use support::*;

const ORIGINAL_URL: &str = epic_export::export::attachments::ORIGINAL_URL_EXTENSION;
const HYDRATE: &str =
    "hydrate: [Medication, Practitioner, PractitionerRole, Organization, Location]\n";

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The attachments of a resource (DocumentReference content, DiagnosticReport presentedForm).
fn attachments_of(r: &Value) -> Vec<&Value> {
    match r["resourceType"].as_str() {
        Some("DocumentReference") => r["content"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| &c["attachment"])
            .collect(),
        Some("DiagnosticReport") => r["presentedForm"]
            .as_array()
            .into_iter()
            .flatten()
            .collect(),
        _ => Vec::new(),
    }
}

/// What the sandbox's resources reference: (Binary id, content type) pairs.
fn referenced_documents(
    want: &BTreeMap<String, BTreeMap<String, Value>>,
) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for t in ["DocumentReference", "DiagnosticReport"] {
        for r in want.get(t).into_iter().flat_map(|m| m.values()) {
            for a in attachments_of(r) {
                let url = a["url"].as_str().unwrap();
                let id = url.rsplit('/').next().unwrap().to_owned();
                out.insert((id, a["contentType"].as_str().unwrap().to_owned()));
            }
        }
    }
    out
}

/// Undoes the exporter's changes to a linked attachment (url back, extension, size and hash gone),
/// checking the file it points at on the way; returns (Binary id, content type).
fn unlink(a: &mut Value, run: &Path, ds: &Dataset) -> (String, String) {
    let file = a["url"].as_str().unwrap().to_owned();
    assert!(file.starts_with("attachments/"), "{file}");
    let ext = a["extension"].as_array().unwrap();
    assert_eq!(ext.last().unwrap()["url"], ORIGINAL_URL);
    let original = ext.last().unwrap()["valueUrl"].as_str().unwrap().to_owned();
    let content_type = a["contentType"].as_str().unwrap().to_owned();
    let id = original.rsplit('/').next().unwrap().to_owned();
    let bytes = std::fs::read(run.join(&file)).unwrap();
    let served = ds.binary(&id).unwrap().bytes(&content_type).unwrap();
    assert_eq!(
        bytes, served,
        "{file}: byte-equal to what the server serves"
    );
    let sha = epic_export::text::hex(digest::digest(&digest::SHA256, &bytes).as_ref());
    assert!(file.starts_with(&format!("attachments/{sha}.")), "{file}");
    assert_eq!(a["size"], bytes.len());
    let o = a.as_object_mut().unwrap();
    o.insert("url".into(), Value::String(original));
    o.remove("size");
    o.remove("hash");
    o.remove("extension");
    (id, content_type)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_export_holds_every_referenced_document_once_and_byte_equal() {
    let env = env(quick(SandboxOptions {
        patients: 6,
        ..SandboxOptions::default()
    }))
    .await;
    let config = env.write_bulk_config(
        &group_block(),
        &format!("{FAST_LIMITS}attachments:\n  enabled: true\n{HYDRATE}"),
    );
    let report = run_config(&config).await;
    assert_eq!(
        report.summary.outcome,
        Outcome::Success,
        "{:?}",
        report.summary.errors
    );
    let ds = env.sandbox.dataset();
    let patients = ds.patient_ids();
    let want = expected_all(ds, &patients);
    let referenced = referenced_documents(&want);
    assert!(
        referenced.len() > 20,
        "the data set has notes: {}",
        referenced.len()
    );

    let mut got = read_run(&report.dir);
    let mut linked = BTreeSet::new();
    for t in ["DocumentReference", "DiagnosticReport"] {
        for r in got.get_mut(t).unwrap().values_mut() {
            let mut found = Vec::new();
            match t {
                "DocumentReference" => {
                    for c in r["content"].as_array_mut().unwrap() {
                        found.push(unlink(&mut c["attachment"], &report.dir, ds));
                    }
                }
                _ => {
                    let forms = r.get_mut("presentedForm").and_then(Value::as_array_mut);
                    for a in forms.into_iter().flatten() {
                        found.push(unlink(a, &report.dir, ds));
                    }
                }
            }
            linked.extend(found);
        }
    }
    assert_eq!(linked, referenced, "every referenced document is linked");
    // Hydrated: exactly the catalogue resources the export references, as the server has them.
    let mut hydrated: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
    for t in [
        "Medication",
        "Practitioner",
        "PractitionerRole",
        "Organization",
        "Location",
    ] {
        let resources = got.remove(t).unwrap_or_default();
        assert!(!resources.is_empty(), "{t} hydrated");
        for (id, r) in &resources {
            assert_eq!(Some(r), ds.catalogue_resource(t, id).as_ref(), "{t}/{id}");
        }
        hydrated.insert(t.to_owned(), resources);
    }
    // With the links undone, every resource is what the server sent.
    assert_same_data(&got, &want);

    let files: Vec<_> = std::fs::read_dir(report.dir.join("attachments"))
        .unwrap()
        .collect();
    assert_eq!(
        files.len(),
        referenced.len(),
        "one file per document, nothing else"
    );
    let stats = env.sandbox.stats();
    assert_eq!(
        stats.binary_reads,
        referenced.len() as u64,
        "each document downloaded once"
    );
    assert_eq!(
        stats.binary_reads_raw, stats.binary_reads,
        "Accept named the type"
    );
    assert!(stats.id_searches > 0);
    assert!(
        stats.reads_by_type.values().all(|n| *n == 0),
        "the sandbox answers _id searches: no reads {:?}",
        stats.reads_by_type
    );
    let manifest = json(&report.dir.join("manifest.json"));
    assert_eq!(manifest["attachments"]["count"], referenced.len());
    let summary = json(&report.dir.join("summary.json"));
    assert_eq!(summary["attachments"]["files"], referenced.len());
    assert_eq!(summary["attachments"]["failed"], 0);
    for (t, resources) in &hydrated {
        assert_eq!(summary["hydration"]["fetched"][t], resources.len(), "{t}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_mode_filters_inlines_and_hydrates_in_batches() {
    let env = env(SandboxOptions {
        patients: 4,
        ..SandboxOptions::default()
    })
    .await;
    let patients = env.sandbox.dataset().patient_ids();
    let config = env.write_config(
        &patients,
        ALL_SEARCHES,
        &format!(
            "{FAST_LIMITS}attachments:\n  enabled: true\n  contentTypes: [text/html]\n  inlineSmallerThan: 1500\n{HYDRATE}"
        ),
    );
    let report = run_config(&config).await;
    assert_eq!(
        report.summary.outcome,
        Outcome::Success,
        "{:?}",
        report.summary.errors
    );
    let ds = env.sandbox.dataset();
    let want = expected(ds, &patients);
    let referenced = referenced_documents(&want);
    let html: BTreeSet<_> = referenced
        .iter()
        .filter(|(_, ct)| ct == "text/html")
        .collect();
    let got = read_run(&report.dir);
    let (mut inlined, mut files, mut untouched) = (0, BTreeSet::new(), 0);
    for t in ["DocumentReference", "DiagnosticReport"] {
        for r in got[t].values() {
            for a in attachments_of(r) {
                let ct = a["contentType"].as_str().unwrap();
                if ct != "text/html" {
                    // Left as the server sent it.
                    assert!(a["url"].as_str().unwrap().contains("Binary/"), "{a}");
                    assert!(
                        a.get("size").is_none() && a.get("extension").is_none(),
                        "{a}"
                    );
                    untouched += 1;
                } else if let Some(data) = a["data"].as_str() {
                    use base64::Engine as _;
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(data)
                        .unwrap();
                    assert!(bytes.len() < 1500, "only small documents are inlined");
                    let id = a["url"].as_str().unwrap().rsplit('/').next().unwrap();
                    assert_eq!(bytes, ds.binary(id).unwrap().bytes(ct).unwrap());
                    inlined += 1;
                } else {
                    let file = a["url"].as_str().unwrap();
                    let size = std::fs::metadata(report.dir.join(file)).unwrap().len();
                    assert!(size >= 1500, "{file}: {size} bytes is a file");
                    files.insert(file.to_owned());
                }
            }
        }
    }
    assert!(
        inlined > 0 && !files.is_empty() && untouched > 0,
        "{inlined} {files:?} {untouched}"
    );
    let on_disk: BTreeSet<String> = std::fs::read_dir(report.dir.join("attachments"))
        .unwrap()
        .map(|e| format!("attachments/{}", e.unwrap().file_name().to_string_lossy()))
        .collect();
    assert_eq!(on_disk, files, "no file for inlined documents");
    let scratch: Vec<String> = std::fs::read_dir(&report.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(
        scratch.is_empty(),
        "no scratch file or index is published: {scratch:?}"
    );
    let stats = env.sandbox.stats();
    assert_eq!(
        stats.binary_reads,
        html.len() as u64,
        "only HTML downloaded, once each"
    );
    let a = report.summary.attachments.as_ref().unwrap();
    assert_eq!(a.skipped as usize, referenced.len() - html.len());
    assert_eq!(a.files as usize, files.len());
    // Hydration: one batched _id search per type and round, no reads.
    let h = report.summary.hydration.as_ref().unwrap();
    assert_eq!(h.failed, 0);
    assert!(h.fetched["Medication"] > 0 && h.fetched["Organization"] > 0);
    assert!(
        stats.id_searches >= 5 && stats.id_searches <= 10,
        "{}",
        stats.id_searches
    );
    assert!(stats.reads_by_type.values().all(|n| *n == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_bulk_run_resumes_without_downloading_documents_again() {
    let env = env(SandboxOptions {
        patients: 6,
        latency: Duration::from_millis(40),
        bulk_delay: Duration::from_millis(300),
        bulk_throttle: Duration::from_secs(3600),
        ..SandboxOptions::default()
    })
    .await;
    let config = env.write_bulk_config(
        &group_block(),
        "limits:\n  concurrency: 2\n  requestsPerSecond: 0\n  maxAttempts: 5\nattachments:\n  enabled: true\n",
    );
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_epic-export"))
        .args(["run", "--no-progress", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let journal_lines = || {
        std::fs::read_dir(env.export_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                std::fs::read_to_string(e.path().join("attachments/.journal.ndjson")).ok()
            })
            .map(|t| t.lines().count())
            .sum::<usize>()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while journal_lines() < 8 {
        assert!(
            std::time::Instant::now() < deadline,
            "the run never downloaded documents"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.kill().await.unwrap();
    child.wait().await.unwrap();
    let before = env.sandbox.stats().binary_reads;
    let kept = journal_lines();

    let report = run_config(&config).await;
    assert_eq!(
        report.summary.outcome,
        Outcome::Success,
        "{:?}",
        report.summary.errors
    );
    assert!(report.summary.bulk.as_ref().unwrap().resumed);
    assert_eq!(env.sandbox.stats().bulk_kickoffs, 1, "no second kick-off");
    let ds = env.sandbox.dataset();
    let referenced = referenced_documents(&expected_all(ds, &ds.patient_ids()));
    let a = report.summary.attachments.as_ref().unwrap();
    assert_eq!(a.reused as usize, kept);
    assert_eq!(a.files as usize, referenced.len());
    let again = env.sandbox.stats().binary_reads - before;
    assert_eq!(
        again as usize,
        referenced.len() - kept,
        "only the documents the killed run did not have are downloaded"
    );
    let files = std::fs::read_dir(report.dir.join("attachments"))
        .unwrap()
        .count();
    assert_eq!(
        files,
        referenced.len(),
        "and no journal or temporary file is left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_on_a_file_host_need_file_hosts_and_never_get_the_token() {
    let env = env(quick(SandboxOptions {
        patients: 3,
        attachments_on_storage: true,
        ..SandboxOptions::default()
    }))
    .await;
    let patients = env.sandbox.dataset().patient_ids();
    let resources = "resource_type,search_params\nDocumentReference,\n";
    let config = env.write_config(
        &patients,
        resources,
        &format!("{FAST_LIMITS}attachments:\n  enabled: true\n"),
    );
    let report = run_config(&config).await;
    assert_eq!(report.summary.outcome, Outcome::Partial);
    assert!(
        report
            .summary
            .errors
            .iter()
            .any(|e| e.contains("attachments")),
        "{:?}",
        report.summary.errors
    );
    let failures =
        std::fs::read_to_string(report.dir.join("errors/failed-requests.ndjson")).unwrap();
    assert!(failures.contains("attachments.fileHosts"), "{failures}");
    assert_eq!(
        env.sandbox.stats().storage_requests,
        0,
        "an unlisted host is not contacted"
    );

    let config = env.write_config(
        &patients,
        resources,
        &format!(
            "{FAST_LIMITS}attachments:\n  enabled: true\n  fileHosts: [{}]\n",
            env.sandbox.storage_origin()
        ),
    );
    let report = run_config(&config).await;
    assert_eq!(
        report.summary.outcome,
        Outcome::Success,
        "{:?}",
        report.summary.errors
    );
    let stats = env.sandbox.stats();
    assert!(stats.storage_attachment_downloads > 0);
    assert_eq!(
        stats.storage_requests_with_authorization, 0,
        "never the token"
    );
    assert!(report.summary.attachments.as_ref().unwrap().files > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_over_max_bytes_are_recorded_and_the_rest_linked() {
    let env = env(SandboxOptions {
        patients: 3,
        ..SandboxOptions::default()
    })
    .await;
    let patients = env.sandbox.dataset().patient_ids();
    let config = env.write_config(
        &patients,
        ALL_SEARCHES,
        &format!("{FAST_LIMITS}attachments:\n  enabled: true\n  maxBytes: 5000\n"),
    );
    let report = run_config(&config).await;
    assert_eq!(report.summary.outcome, Outcome::Partial);
    let ds = env.sandbox.dataset();
    let referenced = referenced_documents(&expected(ds, &patients));
    let size = |(id, ct): &(String, String)| ds.binary(id).unwrap().bytes(ct).unwrap().len();
    let too_big: BTreeSet<_> = referenced.iter().filter(|d| size(d) > 5000).collect();
    assert!(!too_big.is_empty() && too_big.len() < referenced.len());
    let failures: Vec<Value> =
        std::fs::read_to_string(report.dir.join("errors/failed-requests.ndjson"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    assert_eq!(failures.len(), too_big.len(), "one failure per document");
    for f in &failures {
        assert_eq!(f["kind"], "attachment");
        assert!(f["message"].as_str().unwrap().contains("maxBytes"), "{f}");
    }
    let a = report.summary.attachments.as_ref().unwrap();
    assert_eq!(a.failed as usize, too_big.len());
    assert_eq!(a.files as usize, referenced.len() - too_big.len());
    // The resources are all there; the ones with a large document keep its URL.
    let got = read_run(&report.dir);
    let unlinked = got["DocumentReference"]
        .values()
        .chain(got["DiagnosticReport"].values())
        .flat_map(attachments_of)
        .filter(|a| a["url"].as_str().unwrap().contains("Binary/"))
        .count();
    assert!(unlinked >= too_big.len());
    assert_eq!(
        got["DocumentReference"].len(),
        expected(ds, &patients)["DocumentReference"].len()
    );
}
