//! Attachment downloads and reference hydration, run against the notes server
//! (`support/notes_server.rs`), a FHIR server written independently of the sandbox: Binary only as a
//! Binary resource, no `_id` search, files on a second origin, one attachment on a third origin that
//! nothing lists. Each test runs a whole export through the library and checks the run folder
//! (`out/notes/latest/`) and what the servers were asked.
//!
//! `notes_server_serves_like_documented` and the runs without `attachments`/`hydrate` need nothing but
//! the server and today's exporter; the rest follow the attachments and hydration contract.

#[path = "support/notes_server.rs"]
mod notes_server;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use epic_export::auth::{Algorithm, SigningKey, keys};
use epic_export::export::{RunOptions, run};
use notes_server::*;
use serde_json::{Value, json};

const SEARCH: &str = "  search:\n    patients: [p1, p2]\n    resources: [{type: DocumentReference}, {type: DiagnosticReport}, {type: MedicationRequest}]\n";
const BULK: &str = "  bulk:\n    group: g1\n    types: [Patient, DocumentReference, DiagnosticReport]\n    maxWaitHours: 0.01\n";
const HYDRATE: &str =
    "hydrate: [Medication, Practitioner, PractitionerRole, Organization, Location]\n";
/// The types hydration fetches here.
const HYDRATED: [&str; 5] = [
    "Medication",
    "Practitioner",
    "PractitionerRole",
    "Organization",
    "Location",
];

/// A folder with a key and a config for the notes server.
struct Case {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Case {
    /// `source` is the YAML under `source:`; `extra` goes at the end (`attachments:`, `hydrate:`).
    fn new(n: &Notes, source: &str, extra: &str) -> Case {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::generate(Algorithm::ES384).unwrap();
        keys::write_key_pair(&key, &dir.path().join("keys")).unwrap();
        let yaml = format!(
            "name: notes\nfhir:\n  baseUrl: {}\n  tokenUrl: {}\nauth:\n  clientId: notes-client\n  privateKeyFile: keys/private.pem\n\
             source:\n{source}output:\n  directory: out\n\
             limits:\n  concurrency: 2\n  requestsPerSecond: 0\n  maxAttempts: 2\n{extra}",
            n.base_url(),
            n.token_url()
        );
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, yaml).unwrap();
        Case { dir, config }
    }

    fn latest(&self) -> PathBuf {
        self.dir.path().join("out/notes/latest")
    }

    /// Runs the export in this process; returns the run folder.
    async fn run(&self) -> PathBuf {
        let text = std::fs::read_to_string(&self.config).unwrap();
        let plan = epic_export::config::plan_from_text(&text, &self.config, self.dir.path())
            .unwrap_or_else(|e| panic!("the config is accepted: {e}\n{text}"));
        let report = run(&plan, &RunOptions::default())
            .await
            .expect("the run starts");
        report.dir
    }
}

/// `attachments:` enabled, with these further lines (indented 2).
fn attachments(lines: &str) -> String {
    format!("attachments:\n  enabled: true\n{lines}")
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(
        &std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

fn summary(run: &Path) -> Value {
    read_json(&run.join("summary.json"))
}

fn manifest(run: &Path) -> Value {
    read_json(&run.join("manifest.json"))
}

/// `<run>/<Type>.ndjson` by id (empty if there is no such file); fails on duplicates.
fn read_type(run: &Path, resource_type: &str) -> BTreeMap<String, Value> {
    let path = run.join(format!("{resource_type}.ndjson"));
    let mut out = BTreeMap::new();
    let Ok(text) = std::fs::read_to_string(&path) else {
        return out;
    };
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["resourceType"], resource_type);
        let id = v["id"].as_str().unwrap().to_owned();
        assert!(
            out.insert(id.clone(), v).is_none(),
            "{resource_type}/{id} written twice"
        );
    }
    out
}

/// The lines of `errors/failed-requests.ndjson` (none if there is no such file).
fn failures(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("errors/failed-requests.ndjson"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn failures_of_kind(run: &Path, kind: &str) -> Vec<Value> {
    failures(run)
        .into_iter()
        .filter(|f| f["kind"] == kind)
        .collect()
}

/// The files in `<run>/attachments/`, by name.
fn attachment_files(run: &Path) -> BTreeMap<String, Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(run.join("attachments")) else {
        return BTreeMap::new();
    };
    entries
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// The file extension the contract gives a content type.
fn ext(content_type: &str) -> &'static str {
    match media_type(content_type).as_str() {
        "text/html" => "html",
        "text/rtf" | "application/rtf" => "rtf",
        "text/plain" => "txt",
        "application/pdf" => "pdf",
        "image/jpeg" => "jpg",
        "image/png" => "png",
        "image/tiff" => "tif",
        "image/gif" => "gif",
        "application/xml" | "text/xml" => "xml",
        "application/json" => "json",
        _ => "bin",
    }
}

fn file_name(bytes: &[u8], content_type: &str) -> String {
    format!("{}.{}", sha256_hex(bytes), ext(content_type))
}

/// JSON pointers to the attachments of a resource that the feature looks at.
fn attachment_pointers(r: &Value) -> Vec<String> {
    let count = |field: &str| r[field].as_array().map_or(0, Vec::len);
    match r["resourceType"].as_str() {
        Some("DocumentReference") => (0..count("content"))
            .map(|i| format!("/content/{i}/attachment"))
            .collect(),
        Some("DiagnosticReport") => (0..count("presentedForm"))
            .map(|i| format!("/presentedForm/{i}"))
            .collect(),
        _ => Vec::new(),
    }
}

/// What a run should have done with one attachment.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fate {
    Downloaded,
    Inlined,
    /// Filtered out, failed, or not looked at: the attachment is written as the server sent it.
    Unchanged,
}

/// The attachment after a download: url to the file, original-url extension appended, size and hash
/// set when absent.
fn downloaded(original: &Value, bytes: &[u8]) -> Value {
    let mut a = original.clone();
    let url = original["url"].as_str().unwrap();
    let ct = original["contentType"].as_str().unwrap();
    a["url"] = json!(format!("attachments/{}", file_name(bytes, ct)));
    a.as_object_mut()
        .unwrap()
        .entry("extension")
        .or_insert(json!([]))
        .as_array_mut()
        .unwrap()
        .push(json!({"url": ORIGINAL_URL, "valueUrl": url}));
    set_size_and_hash(&mut a, bytes);
    a
}

fn inlined(original: &Value, bytes: &[u8]) -> Value {
    let mut a = original.clone();
    a["data"] = json!(base64(bytes));
    set_size_and_hash(&mut a, bytes);
    a
}

fn set_size_and_hash(a: &mut Value, bytes: &[u8]) {
    if a.get("size").is_none() {
        a["size"] = json!(bytes.len());
    }
    if a.get("hash").is_none() {
        a["hash"] = json!(sha1_base64(bytes));
    }
}

/// Checks every DocumentReference and DiagnosticReport the run wrote against the server's, transformed
/// as `fate(id, attachment)` says; a downloaded attachment's file must hold exactly the server's bytes.
fn check_documents(n: &Notes, run: &Path, fate: impl Fn(&str, &Value) -> Fate) {
    for t in ["DocumentReference", "DiagnosticReport"] {
        let written = read_type(run, t);
        let originals = n.resources_of(t);
        let want_ids: BTreeSet<String> = originals
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            written.keys().cloned().collect::<BTreeSet<_>>(),
            want_ids,
            "{t}: the resources written"
        );
        for original in originals {
            let id = original["id"].as_str().unwrap();
            let mut want = original.clone();
            for pointer in attachment_pointers(&original) {
                let a = original.pointer(&pointer).unwrap();
                let url = a["url"].as_str().unwrap();
                let ct = a["contentType"].as_str().unwrap();
                let new = match fate(id, a) {
                    Fate::Unchanged => continue,
                    Fate::Downloaded => {
                        let bytes = n.attachment_bytes(url, ct).unwrap();
                        let file = run.join("attachments").join(file_name(&bytes, ct));
                        let on_disk = std::fs::read(&file).unwrap_or_else(|e| {
                            panic!("{t}/{id} {url} ({ct}): {}: {e}", file.display())
                        });
                        assert!(
                            on_disk == bytes,
                            "{t}/{id} {url} ({ct}): the file holds the server's bytes"
                        );
                        downloaded(a, &bytes)
                    }
                    Fate::Inlined => inlined(a, &n.attachment_bytes(url, ct).unwrap()),
                };
                *want.pointer_mut(&pointer).unwrap() = new;
            }
            assert_eq!(
                written[id], want,
                "{t}/{id}: written as expected\n got: {}\nwant: {}",
                written[id], want
            );
        }
    }
}

/// Every attachment of the server's documents, with its resource id.
fn all_attachments(n: &Notes) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for t in ["DocumentReference", "DiagnosticReport"] {
        for r in n.resources_of(t) {
            for p in attachment_pointers(&r) {
                out.push((
                    r["id"].as_str().unwrap().to_owned(),
                    r.pointer(&p).unwrap().clone(),
                ));
            }
        }
    }
    out
}

/// Requests for attachment bytes: Binary reads on the FHIR origin and anything on the files origin.
fn attachment_requests(n: &Notes) -> Vec<Seen> {
    n.seen()
        .into_iter()
        .filter(|s| s.server == "files" || s.path().starts_with("/fhir/Binary/"))
        .collect()
}

/// A clean server and a search run with every attachment downloadable.
async fn clean_run() -> (Notes, Case, PathBuf) {
    let n = Notes::start(Options::default()).await;
    let case = Case::new(
        &n,
        SEARCH,
        &attachments(&format!("  fileHosts: [{}]\n", n.files_origin())),
    );
    let run = case.run().await;
    let s = summary(&run);
    assert_eq!(s["outcome"], "success", "{s}\n{:?}", failures(&run));
    (n, case, run)
}

// ---- The server itself (passes without the feature). ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notes_server_serves_like_documented() {
    let n = Notes::start(Options::default()).await;
    let base = n.base_url();
    let http = reqwest::Client::new();
    let bearer = format!("Bearer {TOKEN}");

    // Any assertion gets the token; discovery names the token endpoint.
    let token: Value = http
        .post(n.token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_assertion", "x.y.z"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(token["access_token"], TOKEN);
    let smart: Value = http
        .get(format!("{base}/.well-known/smart-configuration"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(smart["token_endpoint"], n.token_url());

    // FHIR requests need the token.
    let get = |url: String, accept: &str| {
        http.get(url)
            .header("Authorization", &bearer)
            .header("Accept", accept)
            .send()
    };
    let r = http
        .get(format!("{base}/DocumentReference?patient=p1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Searches by patient.
    let r = get(
        format!("{base}/DocumentReference?patient=p1"),
        "application/fhir+json",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let bundle: Value = r.json().await.unwrap();
    assert_eq!(bundle["type"], "searchset");
    let ids: BTreeSet<&str> = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        BTreeSet::from(["dr-note", "dr-scan", "dr-shared-1", "dr-large", "dr-tiny"])
    );
    let bundle: Value = get(
        format!("{base}/MedicationRequest?patient=p2"),
        "application/fhir+json",
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(bundle["entry"].as_array().unwrap().len(), 2);

    // No _id search; reads work.
    let r = get(format!("{base}/Medication?_id=m1"), "application/fhir+json")
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["resourceType"],
        "OperationOutcome"
    );
    let r = get(format!("{base}/Medication/m1"), "application/fhir+json")
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        n.resource("Medication", "m1")
    );
    let r = get(
        format!("{base}/Practitioner/ghost"),
        "application/fhir+json",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 404);

    // Binary: always a Binary resource; the Accept picks the rendition.
    for (accept, want) in [
        ("text/html", note_html()),
        ("text/rtf", note_rtf()),
        ("application/fhir+json", note_html()),
    ] {
        let r = get(format!("{base}/Binary/note1"), accept).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "application/fhir+json");
        let binary: Value = r.json().await.unwrap();
        assert_eq!(binary["resourceType"], "Binary");
        use base64::Engine as _;
        let data = base64::engine::general_purpose::STANDARD
            .decode(binary["data"].as_str().unwrap())
            .unwrap();
        assert!(data == want, "Binary/note1 as {accept}");
    }
    assert_eq!(
        n.attachment_bytes("Binary/note1", "text/rtf").unwrap(),
        note_rtf()
    );
    assert_eq!(
        n.attachment_bytes(&format!("{base}/Binary/shared"), "text/html")
            .unwrap(),
        shared_html()
    );
    assert_eq!(
        n.attachment_bytes("Binary/declared", "text/plain; charset=utf-8")
            .unwrap(),
        declared_txt()
    );

    // The files origin serves raw bytes without a token, and records what it was sent.
    let r = http
        .get(n.scan_url())
        .header("Accept", "application/pdf")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.unwrap() == scan_pdf());
    assert_eq!(
        n.attachment_bytes(&n.scan_url(), "application/pdf")
            .unwrap(),
        scan_pdf()
    );
    let files = n.seen_on("files");
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].path(), "/files/scan.pdf");
    assert_eq!(
        files[0].accept_media_type().as_deref(),
        Some("application/pdf")
    );
    assert!(files[0].authorization.is_none());
    let _ = http
        .get(format!("{}/files/scan.pdf", n.files_origin()))
        .header("Authorization", &bearer)
        .send()
        .await
        .unwrap();
    assert!(n.seen_on("files")[1].has_token(), "the token is recorded");

    // Bulk: kick-off, status, manifest, files (with the token).
    let r = get(
        format!("{base}/Group/g1/$export?_type=Patient,DocumentReference"),
        "application/fhir+json",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 202);
    let status_url = r.headers()["content-location"].to_str().unwrap().to_owned();
    assert!(status_url.starts_with(&base));
    let manifest: Value = get(status_url, "application/json")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(manifest["requiresAccessToken"], true);
    let output = manifest["output"].as_array().unwrap();
    assert_eq!(output.len(), 2);
    let docs = output
        .iter()
        .find(|o| o["type"] == "DocumentReference")
        .unwrap();
    let url = docs["url"].as_str().unwrap().to_owned();
    assert_eq!(http.get(&url).send().await.unwrap().status(), 401);
    let text = get(url, "application/fhir+ndjson")
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        text.lines().count(),
        n.resources_of("DocumentReference").len()
    );
    assert_eq!(n.resources_of("DocumentReference").len(), 8);

    // Every attachment's bytes differ from every other's (one file each).
    let all = [
        note_html(),
        note_rtf(),
        scan_pdf(),
        shared_html(),
        image_png(),
        declared_txt(),
        badhash_pdf(),
        large_pdf(),
        tiny_txt(),
        report_pdf(),
    ];
    assert_eq!(
        all.iter()
            .map(|b| sha256_hex(b))
            .collect::<BTreeSet<_>>()
            .len(),
        all.len()
    );
    assert_eq!(large_pdf().len(), LARGE_LEN);
    assert_eq!(tiny_txt().len(), TINY_LEN);
    assert!(
        all.iter().filter(|b| b.len() < 200).count() == 1,
        "only the tiny one is under 200 bytes"
    );

    // The troublemakers.
    let t = Notes::start(Options {
        troublemakers: true,
    })
    .await;
    let bad = t.resource("DocumentReference", "dr-badhash");
    assert_ne!(
        bad["content"][0]["attachment"]["hash"],
        sha1_base64(&badhash_pdf())
    );
    assert_eq!(
        t.resource("MedicationRequest", "mr2")["recorder"]["reference"],
        "Practitioner/ghost"
    );
    assert!(
        t.resource("DocumentReference", "dr-third")["content"][0]["attachment"]["url"]
            .as_str()
            .unwrap()
            .starts_with(&t.third_origin())
    );
    assert!(t.seen_on("third").is_empty());
    let r = http
        .get(format!("{}/notes/outside.html", t.third_origin()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(t.seen_on("third").len(), 1, "the third origin records too");
}

// ---- Without the feature turned on (passes without the feature). ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_attachments_or_hydrate_nothing_more_is_fetched() {
    let n = Notes::start(Options::default()).await;
    let case = Case::new(&n, SEARCH, "");
    let run = case.run().await;
    assert_eq!(summary(&run)["outcome"], "success");
    check_documents(&n, &run, |_, _| Fate::Unchanged);
    assert!(attachment_files(&run).is_empty());
    assert!(
        attachment_requests(&n).is_empty(),
        "{:?}",
        attachment_requests(&n)
    );
    for t in HYDRATED {
        assert!(n.requests_to(t).is_empty());
        assert!(read_type(&run, t).is_empty(), "{t}");
    }
    assert!(n.seen_on("third").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_export_without_attachments_writes_the_documents_as_sent() {
    let n = Notes::start(Options::default()).await;
    let case = Case::new(&n, BULK, "");
    let run = case.run().await;
    let s = summary(&run);
    assert_eq!(s["outcome"], "success", "{s}\n{:?}", failures(&run));
    check_documents(&n, &run, |_, _| Fate::Unchanged);
    assert_eq!(read_type(&run, "Patient").len(), 2);
    assert!(attachment_requests(&n).is_empty());
}

// ---- Attachments. ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloaded_attachments_are_rewritten_and_byte_equal() {
    let (n, case, run) = clean_run().await;
    assert_eq!(
        std::fs::canonicalize(case.latest()).unwrap(),
        std::fs::canonicalize(&run).unwrap(),
        "the run is published as latest"
    );
    check_documents(&n, &run, |_, _| Fate::Downloaded);
    // Every file is named by the SHA-256 of what it holds.
    let files = attachment_files(&run);
    assert_eq!(files.len(), 9, "{:?}", files.keys());
    // The run log has the downloads, without the patients' ids.
    let lines = support::check_run_log(&run, &PATIENTS.map(String::from));
    let downloads: Vec<&Value> = lines
        .iter()
        .filter(|l| l["event"] == "attachment")
        .collect();
    assert!(downloads.len() >= files.len(), "{lines:#?}");
    // Each line has the size of the body it read, to its end.
    assert!(
        downloads
            .iter()
            .all(|d| d["bytes"].as_u64().is_some_and(|b| b > 0) && d.get("error").is_none()),
        "{downloads:#?}"
    );
    for bytes in files.values() {
        assert!(
            downloads
                .iter()
                .any(|d| d["bytes"].as_u64().unwrap() >= bytes.len() as u64),
            "a line for the {}-byte document",
            bytes.len()
        );
    }
    assert!(
        downloads.iter().all(|d| {
            let p = d["path"].as_str().unwrap();
            p == "/{attachment}" || p.ends_with("/Binary/{id}")
        }),
        "{downloads:#?}"
    );
    for (name, bytes) in &files {
        let (sha, _) = name.split_once('.').unwrap();
        assert_eq!(sha, sha256_hex(bytes), "{name}");
    }
    // The MedicationRequests have no attachments and are written as sent.
    let mrs = read_type(&run, "MedicationRequest");
    for r in n.resources_of("MedicationRequest") {
        assert_eq!(mrs[r["id"].as_str().unwrap()], r);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn html_and_rtf_of_one_binary_are_two_files() {
    let (n, _case, run) = clean_run().await;
    let note = &read_type(&run, "DocumentReference")["dr-note"];
    let html = note["content"][0]["attachment"]["url"].as_str().unwrap();
    let rtf = note["content"][1]["attachment"]["url"].as_str().unwrap();
    assert_eq!(
        html,
        format!("attachments/{}.html", sha256_hex(&note_html()))
    );
    assert_eq!(rtf, format!("attachments/{}.rtf", sha256_hex(&note_rtf())));
    assert!(std::fs::read(run.join(html)).unwrap() == note_html());
    assert!(std::fs::read(run.join(rtf)).unwrap() == note_rtf());
    // Its existing extension is kept, the original URL appended after it.
    assert_eq!(
        note["content"][0]["attachment"]["extension"],
        json!([
            {"url": "http://example.org/fhir/StructureDefinition/note-kind", "valueString": "progress"},
            {"url": ORIGINAL_URL, "valueUrl": "Binary/note1"},
        ])
    );
    // One request per rendition, each asking for its type.
    let asked: Vec<Option<String>> = n
        .requests_to("Binary/note1")
        .iter()
        .map(Seen::accept_media_type)
        .collect();
    assert_eq!(asked.len(), 2, "{asked:?}");
    assert!(asked.contains(&Some("text/html".into())), "{asked:?}");
    assert!(asked.contains(&Some("text/rtf".into())), "{asked:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_url_and_type_is_downloaded_once_across_resources() {
    let (n, _case, run) = clean_run().await;
    // Relative from one patient's document, absolute from the other's: one URL, one request.
    assert_eq!(
        n.requests_to("Binary/shared").len(),
        1,
        "{:?}",
        n.requests_to("Binary/shared")
    );
    let docs = read_type(&run, "DocumentReference");
    let a1 = &docs["dr-shared-1"]["content"][0]["attachment"];
    let a2 = &docs["dr-shared-2"]["content"][0]["attachment"];
    assert_eq!(a1["url"], a2["url"]);
    assert_eq!(a1["extension"][0]["valueUrl"], "Binary/shared");
    assert_eq!(
        a2["extension"][0]["valueUrl"],
        format!("{}/Binary/shared", n.base_url())
    );
    // Nothing is asked twice for the same type.
    let mut counts: BTreeMap<(String, Option<String>), usize> = BTreeMap::new();
    for s in attachment_requests(&n) {
        *counts
            .entry((s.path().to_owned(), s.accept_media_type()))
            .or_default() += 1;
    }
    assert_eq!(counts.len(), 9, "{counts:?}");
    assert!(counts.values().all(|&c| c == 1), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_goes_to_the_fhir_origin_only_and_accept_names_the_type() {
    let (n, _case, _run) = clean_run().await;
    let wanted: BTreeMap<String, BTreeSet<String>> = {
        let mut m: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (_, a) in all_attachments(&n) {
            let url = a["url"].as_str().unwrap();
            let path = if let Some(p) = url.strip_prefix(&n.files_origin()) {
                p.to_owned()
            } else {
                format!(
                    "/fhir/{}",
                    url.strip_prefix(&format!("{}/", n.base_url()))
                        .unwrap_or(url)
                )
            };
            m.entry(path)
                .or_default()
                .insert(media_type(a["contentType"].as_str().unwrap()));
        }
        m
    };
    for s in attachment_requests(&n) {
        let accept = s.accept_media_type().unwrap_or_default();
        assert!(
            wanted[s.path()].contains(&accept),
            "{} asked with Accept {:?}",
            s.path(),
            s.accept
        );
        match s.server {
            "fhir" => assert!(s.has_token(), "{s:?}"),
            _ => assert!(!s.has_token(), "the token went to the files origin: {s:?}"),
        }
    }
    assert_eq!(n.seen_on("files").len(), 1);
    assert!(n.seen_on("third").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manifest_and_summary_list_the_attachments() {
    let (n, _case, run) = clean_run().await;
    // Expected: one file per distinct bytes, with the URLs (as sent) that led to it.
    let mut want: BTreeMap<String, (String, usize, BTreeSet<String>)> = BTreeMap::new();
    for (_, a) in all_attachments(&n) {
        let url = a["url"].as_str().unwrap();
        let ct = a["contentType"].as_str().unwrap();
        let bytes = n.attachment_bytes(url, ct).unwrap();
        want.entry(format!("attachments/{}", file_name(&bytes, ct)))
            .or_insert_with(|| (ct.to_owned(), bytes.len(), BTreeSet::new()))
            .2
            .insert(url.to_owned());
    }
    let total: usize = want.values().map(|w| w.1).sum();

    let m = manifest(&run);
    let att = &m["attachments"];
    assert_eq!(att["count"], want.len(), "{att}");
    assert_eq!(att["bytes"], total, "{att}");
    let files = att["files"].as_array().unwrap();
    assert_eq!(files.len(), want.len());
    for f in files {
        let url = f["url"].as_str().unwrap();
        let (ct, len, sources) = want.get(url).unwrap_or_else(|| panic!("unexpected {f}"));
        let bytes = std::fs::read(run.join(url)).unwrap();
        assert_eq!(f["bytes"], *len, "{f}");
        assert_eq!(bytes.len(), *len, "{f}");
        assert_eq!(f["sha256"], sha256_hex(&bytes), "{f}");
        assert_eq!(
            media_type(f["contentType"].as_str().unwrap()),
            media_type(ct),
            "{f}"
        );
        // Sources: the original URLs (as sent, or resolved against the base).
        let got: Vec<&str> = f["sources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        assert!(!got.is_empty(), "{f}");
        let resolved = |u: &str| {
            if u.starts_with("http") {
                u.to_owned()
            } else {
                format!("{}/{u}", n.base_url())
            }
        };
        let want_resolved: BTreeSet<String> = sources.iter().map(|u| resolved(u)).collect();
        let got_resolved: BTreeSet<String> = got.iter().map(|u| resolved(u)).collect();
        assert_eq!(got_resolved, want_resolved, "{f}");
    }

    let s = &summary(&run)["attachments"];
    assert_eq!(s["files"], want.len(), "{s}");
    assert_eq!(s["bytes"], total, "{s}");
    assert_eq!(s["inlined"], 0, "{s}");
    assert_eq!(s["skipped"], 0, "{s}");
    assert_eq!(s["failed"], 0, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_attachments_are_inlined() {
    let n = Notes::start(Options::default()).await;
    let case = Case::new(
        &n,
        SEARCH,
        &attachments(&format!(
            "  inlineSmallerThan: 64\n  fileHosts: [{}]\n",
            n.files_origin()
        )),
    );
    let run = case.run().await;
    assert_eq!(summary(&run)["outcome"], "success");
    check_documents(&n, &run, |id, _| {
        if id == "dr-tiny" {
            Fate::Inlined
        } else {
            Fate::Downloaded
        }
    });
    let tiny = &read_type(&run, "DocumentReference")["dr-tiny"]["content"][0]["attachment"];
    assert_eq!(tiny["url"], "Binary/tiny");
    assert!(tiny.get("extension").is_none());
    assert_eq!(tiny["size"], TINY_LEN);
    let files = attachment_files(&run);
    assert_eq!(files.len(), 8, "{:?}", files.keys());
    assert!(files.values().all(|b| *b != tiny_txt()), "no file for it");
    assert_eq!(n.requests_to("Binary/tiny").len(), 1);
    let s = &summary(&run)["attachments"];
    assert_eq!(s["inlined"], 1, "{s}");
    assert_eq!(s["files"], 8, "{s}");
    assert_eq!(manifest(&run)["attachments"]["count"], 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_content_type_filter_skips_without_fetching() {
    let n = Notes::start(Options::default()).await;
    // Case and parameters do not matter: `text/plain; charset=utf-8` passes `Text/Plain`.
    let case = Case::new(
        &n,
        SEARCH,
        &attachments(&format!(
            "  contentTypes: [text/HTML, text/rtf, Text/Plain, application/pdf]\n  fileHosts: [{}]\n",
            n.files_origin()
        )),
    );
    let run = case.run().await;
    assert_eq!(summary(&run)["outcome"], "success");
    check_documents(&n, &run, |id, _| {
        if id == "dr-image" {
            Fate::Unchanged
        } else {
            Fate::Downloaded
        }
    });
    assert!(
        n.requests_to("Binary/img1").is_empty(),
        "the PNG is not fetched"
    );
    assert_eq!(n.requests_to("Binary/declared").len(), 1);
    let s = &summary(&run)["attachments"];
    assert_eq!(s["skipped"], 1, "{s}");
    assert_eq!(s["files"], 8, "{s}");
    assert_eq!(s["failed"], 0, "{s}");
    assert!(failures(&run).is_empty(), "skipping is not failing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attachment_over_max_bytes_is_a_recorded_failure() {
    let n = Notes::start(Options::default()).await;
    let case = Case::new(
        &n,
        SEARCH,
        &attachments(&format!(
            "  maxBytes: 200000\n  fileHosts: [{}]\n",
            n.files_origin()
        )),
    );
    let run = case.run().await;
    let s = summary(&run);
    assert_eq!(s["outcome"], "partial", "{s}");
    check_documents(&n, &run, |id, _| {
        if id == "dr-large" {
            Fate::Unchanged
        } else {
            Fate::Downloaded
        }
    });
    let failed = failures_of_kind(&run, "attachment");
    assert_eq!(failed.len(), 1, "{failed:?}");
    let f = &failed[0];
    assert_eq!(f["resourceType"], "DocumentReference", "{f}");
    assert_eq!(f["id"], "dr-large", "{f}");
    assert!(f["url"].as_str().unwrap().ends_with("Binary/large"), "{f}");
    assert_eq!(
        media_type(f["contentType"].as_str().unwrap()),
        "application/pdf"
    );
    assert!(f["message"].is_string(), "{f}");
    // The answer's correlation id is in the record and in the run log's line for it.
    let id = f["correlation"]["x-epic-requestid"].as_str().unwrap();
    let lines = support::check_run_log(&run, &PATIENTS.map(String::from));
    let line = lines
        .iter()
        .find(|l| l["correlation"]["x-epic-requestid"] == id)
        .unwrap();
    assert_eq!(line["event"], "attachment", "{line}");
    assert!(
        line["error"].as_str().unwrap().contains("maxBytes"),
        "{line}"
    );
    let files = attachment_files(&run);
    assert_eq!(files.len(), 8);
    assert!(files.values().all(|b| b.len() < LARGE_LEN));
    assert_eq!(s["attachments"]["failed"], 1, "{s}");
    assert_eq!(s["attachments"]["files"], 8, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_declared_hash_is_a_recorded_failure() {
    let n = Notes::start(Options {
        troublemakers: true,
    })
    .await;
    let case = Case::new(
        &n,
        SEARCH,
        &attachments(&format!("  fileHosts: [{}]\n", n.files_origin())),
    );
    let run = case.run().await;
    let s = summary(&run);
    assert_eq!(s["outcome"], "partial", "{s}");
    check_documents(&n, &run, |id, _| match id {
        "dr-badhash" | "dr-third" => Fate::Unchanged,
        _ => Fate::Downloaded,
    });
    let failed = failures_of_kind(&run, "attachment");
    let bad: Vec<&Value> = failed.iter().filter(|f| f["id"] == "dr-badhash").collect();
    assert_eq!(bad.len(), 1, "{failed:?}");
    assert!(bad[0]["url"].as_str().unwrap().ends_with("Binary/badhash"));
    assert!(
        attachment_files(&run).values().all(|b| *b != badhash_pdf()),
        "no file for bytes that do not match their hash"
    );
    // The correctly declared one keeps its size and hash and is downloaded.
    let declared = &read_type(&run, "DocumentReference")["dr-declared"]["content"][0]["attachment"];
    assert_eq!(declared["hash"], sha1_base64(&declared_txt()));
    assert_eq!(declared["size"], declared_txt().len());
    assert_eq!(s["attachments"]["failed"], 2, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unlisted_origin_is_never_contacted() {
    let n = Notes::start(Options {
        troublemakers: true,
    })
    .await;
    let case = Case::new(
        &n,
        SEARCH,
        &attachments(&format!("  fileHosts: [{}]\n", n.files_origin())),
    );
    let run = case.run().await;
    assert_eq!(summary(&run)["outcome"], "partial");
    assert!(n.seen_on("third").is_empty(), "{:?}", n.seen_on("third"));
    let failed = failures_of_kind(&run, "attachment");
    let third: Vec<&Value> = failed.iter().filter(|f| f["id"] == "dr-third").collect();
    assert_eq!(third.len(), 1, "{failed:?}");
    assert_eq!(
        third[0]["url"],
        format!("{}/notes/outside.html", n.third_origin())
    );
    assert_eq!(
        read_type(&run, "DocumentReference")["dr-third"],
        n.resource("DocumentReference", "dr-third")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_files_origin_needs_file_hosts_and_never_gets_the_token() {
    // Not listed: a recorded failure, and nothing is sent there.
    let n = Notes::start(Options::default()).await;
    let case = Case::new(&n, SEARCH, &attachments(""));
    let run = case.run().await;
    let s = summary(&run);
    assert_eq!(s["outcome"], "partial", "{s}");
    assert!(n.seen_on("files").is_empty(), "{:?}", n.seen_on("files"));
    let failed = failures_of_kind(&run, "attachment");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["id"], "dr-scan");
    assert_eq!(failed[0]["url"], n.scan_url());
    check_documents(&n, &run, |id, _| {
        if id == "dr-scan" {
            Fate::Unchanged
        } else {
            Fate::Downloaded
        }
    });

    // Listed in fileHosts: downloaded, without the token.
    let n = Notes::start(Options::default()).await;
    let case = Case::new(
        &n,
        SEARCH,
        &attachments(&format!("  fileHosts: [{}]\n", n.files_origin())),
    );
    let run = case.run().await;
    assert_eq!(summary(&run)["outcome"], "success");
    let files = n.seen_on("files");
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(files[0].path(), "/files/scan.pdf");
    assert_eq!(
        files[0].accept_media_type().as_deref(),
        Some("application/pdf")
    );
    assert!(!files[0].has_token(), "{:?}", files[0]);
    let scan = &read_type(&run, "DocumentReference")["dr-scan"]["content"][0]["attachment"];
    assert_eq!(
        scan["url"],
        format!("attachments/{}.pdf", sha256_hex(&scan_pdf()))
    );
    assert_eq!(scan["extension"][0]["valueUrl"], n.scan_url());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_hosts_are_trusted_with_the_token() {
    let n = Notes::start(Options::default()).await;
    let case = Case::new(
        &n,
        SEARCH,
        &attachments(&format!("  tokenHosts: [{}]\n", n.files_origin())),
    );
    let run = case.run().await;
    assert_eq!(summary(&run)["outcome"], "success");
    let files = n.seen_on("files");
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].has_token(), "{:?}", files[0]);
    check_documents(&n, &run, |_, _| Fate::Downloaded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_export_downloads_attachments_too() {
    let n = Notes::start(Options::default()).await;
    let case = Case::new(
        &n,
        BULK,
        &attachments(&format!("  fileHosts: [{}]\n", n.files_origin())),
    );
    let run = case.run().await;
    let s = summary(&run);
    assert_eq!(s["outcome"], "success", "{s}\n{:?}", failures(&run));
    assert!(!n.requests_to("Group/g1/$export").is_empty());
    check_documents(&n, &run, |_, _| Fate::Downloaded);
    assert_eq!(read_type(&run, "Patient").len(), 2);
    assert_eq!(n.requests_to("Binary/shared").len(), 1);
    assert_eq!(attachment_files(&run).len(), 9);
    assert_eq!(manifest(&run)["attachments"]["count"], 9);
    for s in attachment_requests(&n) {
        assert_eq!(s.server == "fhir", s.has_token(), "{s:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_exits_partial_when_an_attachment_fails() {
    let n = Notes::start(Options::default()).await;
    let case = Case::new(
        &n,
        SEARCH,
        &attachments(&format!(
            "  maxBytes: 200000\n  fileHosts: [{}]\n",
            n.files_origin()
        )),
    );
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_epic-export"))
        .args(["run", "--no-progress", "--config"])
        .arg(&case.config)
        .env("RUST_LOG", "info")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(3), "partial\n{stderr}");
    let run = case.latest();
    assert_eq!(summary(&run)["outcome"], "partial");
    assert_eq!(failures_of_kind(&run, "attachment").len(), 1);
    assert!(!stderr.contains(TOKEN), "the token is not logged");
}

// ---- Hydration. ----

/// The `_id` searches and reads the FHIR origin saw for one type.
fn id_searches(n: &Notes, t: &str) -> Vec<Seen> {
    n.requests_to(t)
        .into_iter()
        .filter(|s| s.query().is_some_and(|q| q.contains("_id=")))
        .collect()
}

fn reads(n: &Notes, t: &str, id: &str) -> usize {
    n.requests_to(&format!("{t}/{id}")).len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hydration_reads_after_the_id_search_is_refused() {
    let n = Notes::start(Options::default()).await;
    let case = Case::new(&n, SEARCH, HYDRATE);
    let run = case.run().await;
    let s = summary(&run);
    assert_eq!(s["outcome"], "success", "{s}\n{:?}", failures(&run));
    // Medication m1, referenced relatively by one request and absolutely by the other: one read.
    assert_eq!(
        read_type(&run, "Medication"),
        BTreeMap::from([("m1".to_owned(), n.resource("Medication", "m1"))])
    );
    assert_eq!(reads(&n, "Medication", "m1"), 1);
    for t in HYDRATED {
        assert_eq!(
            id_searches(&n, t).len(),
            1,
            "{t}: the _id search is tried once, then reads: {:?}",
            n.requests_to(t)
        );
    }
    // The referring resources are written as sent.
    let mrs = read_type(&run, "MedicationRequest");
    for r in n.resources_of("MedicationRequest") {
        assert_eq!(mrs[r["id"].as_str().unwrap()], r);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hydration_follows_references_for_three_rounds() {
    let n = Notes::start(Options::default()).await;
    let case = Case::new(&n, SEARCH, HYDRATE);
    let run = case.run().await;
    let s = summary(&run);
    assert_eq!(s["outcome"], "success", "{s}");
    let lines = support::check_run_log(&run, &PATIENTS.map(String::from));
    assert!(lines.iter().any(|l| l["event"] == "hydrate"), "{lines:#?}");
    // Round 1: m1, r1. Round 2: d1, o1, l1 (from r1). Round 3: o0 (o1's parent). Its parent, oroot,
    // would take a fourth round.
    let want: [(&str, &[&str]); 5] = [
        ("Medication", &["m1"]),
        ("PractitionerRole", &["r1"]),
        ("Practitioner", &["d1"]),
        ("Organization", &["o0", "o1"]),
        ("Location", &["l1"]),
    ];
    for (t, ids) in want {
        let got = read_type(&run, t);
        assert_eq!(
            got.keys().map(String::as_str).collect::<Vec<_>>(),
            ids.to_vec(),
            "{t}"
        );
        for id in ids {
            assert_eq!(
                got[*id],
                n.resource(t, id),
                "{t}/{id} as the server holds it"
            );
            assert_eq!(reads(&n, t, id), 1, "{t}/{id} is read once");
        }
    }
    assert_eq!(reads(&n, "Organization", "oroot"), 0, "no fourth round");
    let h = &s["hydration"];
    assert_eq!(h["rounds"], 3, "{h}");
    assert_eq!(
        h["fetched"],
        json!({"Medication": 1, "PractitionerRole": 1, "Practitioner": 1, "Organization": 2, "Location": 1}),
        "{h}"
    );
    assert_eq!(h["failed"], 0, "{h}");
    let manifest = manifest(&run);
    for t in HYDRATED {
        assert!(
            manifest["output"]
                .as_array()
                .unwrap()
                .iter()
                .any(|o| o["type"] == t),
            "{t} in the manifest: {manifest}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contained_and_foreign_references_are_never_fetched() {
    let n = Notes::start(Options::default()).await;
    let case = Case::new(&n, SEARCH, HYDRATE);
    let run = case.run().await;
    assert_eq!(summary(&run)["outcome"], "success");
    for s in n.seen_on("fhir") {
        assert!(
            !s.path_and_query.contains("med1")
                && !s.path_and_query.contains("zz")
                && !s.path_and_query.contains("d9")
                && !s.path_and_query.contains("other.example.org"),
            "{s:?}"
        );
    }
    assert!(n.seen_on("third").is_empty(), "{:?}", n.seen_on("third"));
    assert!(!read_type(&run, "Medication").contains_key("med1"));
    assert!(!read_type(&run, "Medication").contains_key("zz"));
    assert!(!read_type(&run, "Practitioner").contains_key("d9"));
    assert!(failures(&run).is_empty(), "{:?}", failures(&run));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_reference_is_a_recorded_failure() {
    let n = Notes::start(Options {
        troublemakers: true,
    })
    .await;
    let case = Case::new(&n, SEARCH, HYDRATE);
    let run = case.run().await;
    let s = summary(&run);
    assert_eq!(s["outcome"], "partial", "{s}");
    let failed = failures_of_kind(&run, "hydrate");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(
        failed[0]["reference"], "Practitioner/ghost",
        "{}",
        failed[0]
    );
    assert_eq!(failed[0]["status"], 404, "{}", failed[0]);
    assert!(
        failed[0]["correlation"]["x-epic-requestid"]
            .as_str()
            .is_some_and(|id| id.starts_with("fhir-")),
        "{}",
        failed[0]
    );
    assert_eq!(reads(&n, "Practitioner", "ghost"), 1);
    // The rest of the hydration is unaffected.
    let practitioners = read_type(&run, "Practitioner");
    assert_eq!(practitioners.keys().collect::<Vec<_>>(), ["d1"]);
    assert_eq!(read_type(&run, "Organization").len(), 2);
    assert_eq!(s["hydration"]["failed"], 1, "{s}");
    assert_eq!(s["hydration"]["fetched"]["Practitioner"], 1, "{s}");
}
