//! A second FHIR server, written independently of the project's sandbox, for the attachment download
//! and reference hydration tests: clinical notes as DocumentReferences (Epic style: one Binary offered
//! as HTML and as RTF), a DiagnosticReport with a presented form, MedicationRequests whose references
//! lead through PractitionerRole to Practitioner, Organization and a parent Organization.
//!
//! It differs from the sandbox on purpose: Binary is only ever served as a FHIR `Binary` resource
//! (base64 `data`, `application/fhir+json`) whatever the Accept says (the Accept only picks the
//! rendition); `_id` searches are refused with 400 (reads work); some attachments live on a second
//! "files" origin that serves raw bytes without a token; one lives on a third origin that nothing
//! lists. Every request to any of the three origins is recorded with its Accept and Authorization.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};

/// The access token the token endpoint hands out (for any client assertion).
pub const TOKEN: &str = "notes-access-token-51c0a8e2";

/// The extension the exporter appends to a downloaded attachment.
pub const ORIGINAL_URL: &str = "https://fhirexport.dev/fhir/StructureDefinition/original-url";

/// The patients (the Group `g1` holds both).
pub const PATIENTS: [&str; 2] = ["p1", "p2"];

/// Length of `large_pdf()`, and of `tiny_txt()`.
pub const LARGE_LEN: usize = 300 * 1024;
pub const TINY_LEN: usize = 40;

/// What the server holds beyond the well-behaved data.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Adds the troublemakers: `dr-badhash` (declared hash is wrong), `dr-third` (an attachment on the
    /// third origin) and a `Practitioner/ghost` reference on `mr2` (the read answers 404).
    pub troublemakers: bool,
}

/// One request one of the origins saw.
#[derive(Clone, Debug)]
pub struct Seen {
    /// `fhir`, `files` or `third`.
    pub server: &'static str,
    pub method: String,
    pub path_and_query: String,
    pub accept: Option<String>,
    pub authorization: Option<String>,
}

impl Seen {
    pub fn path(&self) -> &str {
        self.path_and_query
            .split_once('?')
            .map_or(self.path_and_query.as_str(), |(p, _)| p)
    }

    pub fn query(&self) -> Option<&str> {
        self.path_and_query.split_once('?').map(|(_, q)| q)
    }

    /// The Accept header's first media type, without parameters, lowercased.
    pub fn accept_media_type(&self) -> Option<String> {
        self.accept.as_deref().map(media_type)
    }

    pub fn has_token(&self) -> bool {
        self.authorization
            .as_deref()
            .is_some_and(|a| a.contains(TOKEN))
    }
}

/// `text/plain; charset=utf-8, */*` → `text/plain`.
pub fn media_type(s: &str) -> String {
    s.split(',')
        .next()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The FHIR `Attachment.hash`: base64 of the SHA-1 of the bytes.
pub fn sha1_base64(bytes: &[u8]) -> String {
    B64.encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY,
        bytes,
    ))
}

pub fn base64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

// ---- The attachment bytes (all different, so every one is its own file). ----

fn padded(mut text: String, min_len: usize, filler: &str) -> Vec<u8> {
    while text.len() < min_len {
        text.push_str(filler);
    }
    text.into_bytes()
}

/// `Binary/note1` as text/html.
pub fn note_html() -> Vec<u8> {
    padded(
        "<html><head><title>Progress note</title></head><body><p>Patient seen for follow-up. \
         Blood pressure well controlled; continue lisinopril.</p>"
            .into(),
        600,
        "<p>Plan discussed with the patient.</p>",
    )
    .into_iter()
    .chain(b"</body></html>\n".iter().copied())
    .collect()
}

/// `Binary/note1` as text/rtf: the same note, another rendition.
pub fn note_rtf() -> Vec<u8> {
    padded(
        "{\\rtf1\\ansi\\deff0 {\\fonttbl {\\f0 Arial;}}\\f0\\fs20 Patient seen for follow-up. \
         Blood pressure well controlled; continue lisinopril.\\par "
            .into(),
        700,
        "Plan discussed with the patient.\\par ",
    )
    .into_iter()
    .chain(b"}\n".iter().copied())
    .collect()
}

/// A PDF-ish body with bytes that are not UTF-8, distinct per `seed`.
fn pdf(seed: u32, len: usize) -> Vec<u8> {
    let mut v = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n".to_vec();
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
    while v.len() < len.saturating_sub(6) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        v.push((x >> 11) as u8);
    }
    v.extend_from_slice(b"%%EOF\n");
    v
}

/// `{files}/files/scan.pdf`, on the files origin.
pub fn scan_pdf() -> Vec<u8> {
    pdf(1, 2_000)
}

/// `Binary/shared` (text/html), referenced by two DocumentReferences of two patients.
pub fn shared_html() -> Vec<u8> {
    padded(
        "<html><body><h1>Discharge instructions</h1>".into(),
        400,
        "<p>Drink fluids and rest.</p>",
    )
}

/// `Binary/img1` as image/png.
pub fn image_png() -> Vec<u8> {
    let mut v = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR".to_vec();
    v.extend((0..300u32).map(|i| (i * 7 % 256) as u8));
    v
}

/// `Binary/declared` (text/plain; its DocumentReference declares size and hash correctly).
pub fn declared_txt() -> Vec<u8> {
    padded(
        "Telephone encounter: patient asks about refill timing.\n".into(),
        300,
        "Advised to call the pharmacy.\n",
    )
}

/// `Binary/badhash` (application/pdf; its DocumentReference declares a wrong hash).
pub fn badhash_pdf() -> Vec<u8> {
    pdf(2, 1_500)
}

/// `Binary/large` (application/pdf), `LARGE_LEN` bytes.
pub fn large_pdf() -> Vec<u8> {
    pdf(3, LARGE_LEN)
}

/// `Binary/tiny` (text/plain), `TINY_LEN` bytes.
pub fn tiny_txt() -> Vec<u8> {
    let v = b"Nurse note: vitals within normal range.\n".to_vec();
    assert_eq!(v.len(), TINY_LEN);
    v
}

/// `Binary/report1` (application/pdf), the DiagnosticReport's presented form.
pub fn report_pdf() -> Vec<u8> {
    pdf(4, 3_000)
}

/// What the third origin answers to anything (it must never be asked).
pub fn third_html() -> Vec<u8> {
    b"<html><body>outside note store</body></html>\n".to_vec()
}

// ---- The server. ----

/// The data, which names the origins it was started on.
struct Data {
    base: String,
    /// Every resource the server holds (searchable by patient, readable by id).
    resources: Vec<Value>,
    /// Binary id → renditions (content type, bytes); the first is the default.
    binaries: BTreeMap<String, Vec<(String, Vec<u8>)>>,
    /// Path on the files origin → (content type, bytes).
    files: BTreeMap<String, (String, Vec<u8>)>,
}

#[derive(Clone)]
struct Shared {
    name: &'static str,
    token_url: String,
    data: Arc<Data>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

pub struct Notes {
    pub fhir: SocketAddr,
    pub files: SocketAddr,
    pub third: SocketAddr,
    data: Arc<Data>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Notes {
    pub async fn start(opts: Options) -> Notes {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let fhir = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let files = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let third = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addrs = (
            fhir.local_addr().unwrap(),
            files.local_addr().unwrap(),
            third.local_addr().unwrap(),
        );
        let data = Arc::new(build(
            &format!("http://{}/fhir", addrs.0),
            &format!("http://{}", addrs.1),
            &format!("http://{}", addrs.2),
            opts,
        ));
        let token_url = format!("http://{}/oauth2/token", addrs.0);
        for (listener, name) in [(fhir, "fhir"), (files, "files"), (third, "third")] {
            let shared = Shared {
                name,
                token_url: token_url.clone(),
                data: data.clone(),
                seen: seen.clone(),
            };
            let app = Router::new().fallback(handle).with_state(shared);
            tokio::spawn(async move { axum::serve(listener, app).await });
        }
        Notes {
            fhir: addrs.0,
            files: addrs.1,
            third: addrs.2,
            data,
            seen,
        }
    }

    pub fn base_url(&self) -> String {
        self.data.base.clone()
    }

    pub fn token_url(&self) -> String {
        format!("http://{}/oauth2/token", self.fhir)
    }

    /// `http://127.0.0.1:PORT` of the files origin (for `attachments.fileHosts`).
    pub fn files_origin(&self) -> String {
        format!("http://{}", self.files)
    }

    /// `http://127.0.0.1:PORT` of the origin nothing lists.
    pub fn third_origin(&self) -> String {
        format!("http://{}", self.third)
    }

    /// The absolute URL of `scan.pdf` on the files origin.
    pub fn scan_url(&self) -> String {
        format!("{}/files/scan.pdf", self.files_origin())
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn seen_on(&self, server: &str) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.server == server)
            .collect()
    }

    /// Requests to the FHIR origin whose path (without query) is `/fhir/{rel}`.
    pub fn requests_to(&self, rel: &str) -> Vec<Seen> {
        let path = format!("/fhir/{rel}");
        self.seen_on("fhir")
            .into_iter()
            .filter(|s| s.path() == path)
            .collect()
    }

    /// One resource as the server holds it.
    pub fn resource(&self, resource_type: &str, id: &str) -> Value {
        self.data
            .find(resource_type, id)
            .unwrap_or_else(|| panic!("the server holds no {resource_type}/{id}"))
            .clone()
    }

    /// Every resource of a type, as the server holds them.
    pub fn resources_of(&self, resource_type: &str) -> Vec<Value> {
        self.data
            .resources
            .iter()
            .filter(|r| r["resourceType"] == resource_type)
            .cloned()
            .collect()
    }

    /// The bytes an attachment `url` (as sent, relative or absolute) of `content_type` stands for, as
    /// a client gets them after decoding a Binary; `None` for the third origin or an unknown URL.
    pub fn attachment_bytes(&self, url: &str, content_type: &str) -> Option<Vec<u8>> {
        let rel = url
            .strip_prefix(&format!("{}/", self.data.base))
            .unwrap_or(url);
        if let Some(id) = rel.strip_prefix("Binary/") {
            let renditions = self.data.binaries.get(id)?;
            return Some(pick(renditions, content_type).1.clone());
        }
        let path = url.strip_prefix(&self.files_origin())?;
        self.data.files.get(path).map(|(_, b)| b.clone())
    }
}

impl Data {
    fn find(&self, resource_type: &str, id: &str) -> Option<&Value> {
        self.resources
            .iter()
            .find(|r| r["resourceType"] == resource_type && r["id"] == id)
    }

    fn of_patient<'a>(
        &'a self,
        resource_type: &'a str,
        patient: &'a str,
    ) -> impl Iterator<Item = &'a Value> + 'a {
        let subject = format!("Patient/{patient}");
        self.resources.iter().filter(move |r| {
            r["resourceType"] == resource_type
                && (r["subject"]["reference"] == subject.as_str()
                    || (resource_type == "Patient" && r["id"] == patient))
        })
    }
}

/// The rendition the Accept asks for, else the first.
fn pick<'a>(renditions: &'a [(String, Vec<u8>)], accept: &str) -> &'a (String, Vec<u8>) {
    let wanted: Vec<String> = accept.split(',').map(media_type).collect();
    renditions
        .iter()
        .find(|(ct, _)| wanted.iter().any(|w| w == ct))
        .unwrap_or(&renditions[0])
}

fn reference(r: &str) -> Value {
    json!({ "reference": r })
}

fn document(id: &str, patient: &str, title: &str, attachments: Vec<Value>) -> Value {
    json!({
        "resourceType": "DocumentReference",
        "id": id,
        "meta": {"versionId": "1", "lastUpdated": "2026-03-01T10:00:00Z"},
        "status": "current",
        "docStatus": "final",
        "type": {"coding": [{"system": "http://loinc.org", "code": "11506-3", "display": "Progress note"}], "text": title},
        "category": [{"coding": [{"system": "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category", "code": "clinical-note"}]}],
        "subject": reference(&format!("Patient/{patient}")),
        "date": "2026-03-01T10:00:00Z",
        "content": attachments.into_iter().map(|a| json!({
            "attachment": a,
            "format": {"system": "http://ihe.net/fhir/ValueSet/IHE.FormatCode.codesystem", "code": "urn:ihe:iti:xds:2017:mimeTypeSufficient"},
        })).collect::<Vec<_>>(),
        "context": {"period": {"start": "2026-03-01T09:30:00Z"}},
    })
}

fn build(base: &str, files: &str, third: &str, opts: Options) -> Data {
    let mut binaries = BTreeMap::new();
    let mut add = |id: &str, renditions: Vec<(&str, Vec<u8>)>| {
        binaries.insert(
            id.to_owned(),
            renditions
                .into_iter()
                .map(|(ct, b)| (ct.to_owned(), b))
                .collect::<Vec<_>>(),
        );
    };
    add(
        "note1",
        vec![("text/html", note_html()), ("text/rtf", note_rtf())],
    );
    add("shared", vec![("text/html", shared_html())]);
    add("img1", vec![("image/png", image_png())]);
    add("declared", vec![("text/plain", declared_txt())]);
    add("badhash", vec![("application/pdf", badhash_pdf())]);
    add("large", vec![("application/pdf", large_pdf())]);
    add("tiny", vec![("text/plain", tiny_txt())]);
    add("report1", vec![("application/pdf", report_pdf())]);
    let mut file_map = BTreeMap::new();
    file_map.insert(
        "/files/scan.pdf".to_owned(),
        ("application/pdf".to_owned(), scan_pdf()),
    );

    let declared = declared_txt();
    let mut resources = vec![
        json!({"resourceType": "Patient", "id": "p1", "name": [{"family": "Lindqvist", "given": ["Ada"]}]}),
        json!({"resourceType": "Patient", "id": "p2", "name": [{"family": "Okafor", "given": ["Ben"]}]}),
        // One note, two renditions of the same Binary; the HTML one already carries an extension.
        document(
            "dr-note",
            "p1",
            "Progress note",
            vec![
                json!({
                    "extension": [{"url": "http://example.org/fhir/StructureDefinition/note-kind", "valueString": "progress"}],
                    "contentType": "text/html",
                    "url": "Binary/note1",
                    "title": "Progress note (HTML)",
                }),
                json!({"contentType": "text/rtf", "url": "Binary/note1", "title": "Progress note (RTF)"}),
            ],
        ),
        document(
            "dr-scan",
            "p1",
            "Outside records",
            vec![
                json!({"contentType": "application/pdf", "url": format!("{files}/files/scan.pdf"), "title": "Scanned outside records"}),
            ],
        ),
        // The same Binary for two patients: relative from one, absolute (under the base) from the other.
        document(
            "dr-shared-1",
            "p1",
            "Discharge instructions",
            vec![json!({"contentType": "text/html", "url": "Binary/shared"})],
        ),
        document(
            "dr-shared-2",
            "p2",
            "Discharge instructions",
            vec![json!({"contentType": "text/html", "url": format!("{base}/Binary/shared")})],
        ),
        document(
            "dr-image",
            "p2",
            "Wound photo",
            vec![json!({"contentType": "image/png", "url": "Binary/img1"})],
        ),
        document(
            "dr-declared",
            "p2",
            "Telephone encounter",
            vec![json!({
                "contentType": "text/plain; charset=utf-8",
                "url": "Binary/declared",
                "size": declared.len(),
                "hash": sha1_base64(&declared),
            })],
        ),
        document(
            "dr-large",
            "p1",
            "Echocardiogram",
            vec![json!({"contentType": "application/pdf", "url": "Binary/large"})],
        ),
        document(
            "dr-tiny",
            "p1",
            "Nurse note",
            vec![json!({"contentType": "text/plain", "url": "Binary/tiny"})],
        ),
        json!({
            "resourceType": "DiagnosticReport",
            "id": "diag1",
            "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "36643-5", "display": "XR Chest 2V"}]},
            "subject": reference("Patient/p1"),
            "effectiveDateTime": "2026-02-27T08:00:00Z",
            "conclusion": "No acute findings.",
            "presentedForm": [{"contentType": "application/pdf", "url": "Binary/report1", "title": "Chest X-ray report"}],
        }),
        // Medication m1, shared by both patients (the second names it by an absolute URL under the base).
        json!({
            "resourceType": "MedicationRequest",
            "id": "mr1",
            "status": "active",
            "intent": "order",
            "subject": reference("Patient/p1"),
            "medicationReference": {"reference": "Medication/m1", "display": "lisinopril 10 mg tablet"},
            "requester": reference("PractitionerRole/r1"),
            "authoredOn": "2026-02-01",
        }),
        json!({
            "resourceType": "MedicationRequest",
            "id": "mr2",
            "status": "active",
            "intent": "order",
            "subject": reference("Patient/p2"),
            "medicationReference": reference(&format!("{base}/Medication/m1")),
            "requester": reference("PractitionerRole/r1"),
            "authoredOn": "2026-02-03",
        }),
        // A contained medication: never fetched.
        json!({
            "resourceType": "MedicationRequest",
            "id": "mr3",
            "status": "active",
            "intent": "order",
            "contained": [{"resourceType": "Medication", "id": "med1", "code": {"text": "compounded cream"}}],
            "subject": reference("Patient/p1"),
            "medicationReference": reference("#med1"),
            "authoredOn": "2026-02-05",
        }),
        // References to other servers: never fetched.
        json!({
            "resourceType": "MedicationRequest",
            "id": "mr4",
            "status": "completed",
            "intent": "order",
            "subject": reference("Patient/p2"),
            "medicationReference": reference("https://other.example.org/fhir/Medication/zz"),
            "performer": reference(&format!("{third}/fhir/Practitioner/d9")),
            "authoredOn": "2025-11-20",
        }),
        // Reached by hydration only.
        json!({
            "resourceType": "Medication",
            "id": "m1",
            "code": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "314076", "display": "lisinopril 10 MG Oral Tablet"}]},
            "status": "active",
        }),
        json!({
            "resourceType": "PractitionerRole",
            "id": "r1",
            "active": true,
            "practitioner": reference("Practitioner/d1"),
            "organization": reference("Organization/o1"),
            "location": [reference("Location/l1")],
            "code": [{"text": "Attending physician"}],
        }),
        json!({"resourceType": "Practitioner", "id": "d1", "name": [{"family": "Haddad", "given": ["Rima"], "prefix": ["Dr."]}]}),
        json!({
            "resourceType": "Location",
            "id": "l1",
            "name": "Cardiology Clinic, 3rd floor",
            "managingOrganization": reference("Organization/o1"),
        }),
        json!({"resourceType": "Organization", "id": "o1", "name": "Cardiology", "partOf": reference("Organization/o0")}),
        // o0 is in the third round; its parent would be in a fourth, which never comes.
        json!({"resourceType": "Organization", "id": "o0", "name": "Riverside Health", "partOf": reference("Organization/oroot")}),
        json!({"resourceType": "Organization", "id": "oroot", "name": "Riverside Health Holdings"}),
    ];
    if opts.troublemakers {
        resources.push(document(
            "dr-badhash",
            "p2",
            "Cardiology consult",
            vec![json!({
                "contentType": "application/pdf",
                "url": "Binary/badhash",
                "size": badhash_pdf().len(),
                "hash": sha1_base64(b"not these bytes"),
            })],
        ));
        resources.push(document(
            "dr-third",
            "p2",
            "Outside note",
            vec![json!({"contentType": "text/html", "url": format!("{third}/notes/outside.html")})],
        ));
        let mr2 = resources.iter_mut().find(|r| r["id"] == "mr2").unwrap();
        mr2["recorder"] = reference("Practitioner/ghost");
    }
    Data {
        base: base.to_owned(),
        resources,
        binaries,
        files: file_map,
    }
}

fn fhir_json(status: StatusCode, v: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/fhir+json")],
        v.to_string(),
    )
        .into_response()
}

fn outcome(status: StatusCode, code: &str, diagnostics: &str) -> Response {
    fhir_json(
        status,
        &json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}]}),
    )
}

fn searchset(base: &str, self_url: &str, resources: Vec<Value>) -> Value {
    json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": resources.len(),
        "link": [{"relation": "self", "url": format!("{base}/{self_url}")}],
        "entry": resources.into_iter().map(|r| {
            let full_url = format!("{base}/{}/{}", r["resourceType"].as_str().unwrap(), r["id"].as_str().unwrap());
            json!({"fullUrl": full_url, "resource": r, "search": {"mode": "match"}})
        }).collect::<Vec<_>>(),
    })
}

async fn handle(State(s): State<Shared>, headers: HeaderMap, req: Request) -> Response {
    let text = |name: header::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let seen = Seen {
        server: s.name,
        method: req.method().to_string(),
        path_and_query: path_and_query.clone(),
        accept: text(header::ACCEPT),
        authorization: text(header::AUTHORIZATION),
    };
    let number = {
        let mut all = s.seen.lock().unwrap();
        all.push(seen.clone());
        all.len()
    };
    let mut resp = match s.name {
        "files" => match s.data.files.get(seen.path()) {
            Some((ct, bytes)) if req.method() == Method::GET => (
                StatusCode::OK,
                [(header::CONTENT_TYPE, ct.clone())],
                bytes.clone(),
            )
                .into_response(),
            _ => (StatusCode::NOT_FOUND, "no such file").into_response(),
        },
        // A willing server: it would answer anything, which is why nobody may ask it.
        "third" => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/html")],
            third_html(),
        )
            .into_response(),
        _ => fhir(&s, &seen, req.method()),
    };
    // Every answer has a correlation id, as Epic's do (`X-Epic-*`), for the run log and failures.
    if let Ok(v) = format!("{}-{number}", s.name).parse() {
        resp.headers_mut().insert("x-epic-requestid", v);
    }
    resp
}

fn fhir(s: &Shared, seen: &Seen, method: &Method) -> Response {
    let data = &s.data;
    let path = seen.path();
    if path == "/fhir/.well-known/smart-configuration" {
        return fhir_json(
            StatusCode::OK,
            &json!({"token_endpoint": s.token_url, "grant_types_supported": ["client_credentials"]}),
        );
    }
    if path == "/oauth2/token" {
        return (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            json!({"access_token": TOKEN, "token_type": "Bearer", "expires_in": 3600, "scope": "system/*.read"})
                .to_string(),
        )
            .into_response();
    }
    if seen.authorization.as_deref() != Some(&format!("Bearer {TOKEN}")) {
        return outcome(
            StatusCode::UNAUTHORIZED,
            "login",
            "a bearer token is required",
        );
    }
    let Some(rel) = path.strip_prefix("/fhir/") else {
        return outcome(StatusCode::NOT_FOUND, "not-found", "not a FHIR path");
    };
    let query: Vec<(String, String)> =
        url::form_urlencoded::parse(seen.query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let param = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let segments: Vec<&str> = rel.split('/').collect();

    // Bulk Data: kick-off, status (with the asked types in the path), files.
    match segments.as_slice() {
        ["Group", "g1", "$export"] => {
            let types = param("_type").unwrap_or("all").replace(',', "+");
            return (
                StatusCode::ACCEPTED,
                [(
                    header::CONTENT_LOCATION,
                    format!("{}/bulk-status/{types}", data.base),
                )],
                "",
            )
                .into_response();
        }
        ["bulk-status", _] if *method == Method::DELETE => {
            return StatusCode::ACCEPTED.into_response();
        }
        ["bulk-status", types] => {
            let all = [
                "Patient",
                "DocumentReference",
                "DiagnosticReport",
                "MedicationRequest",
            ];
            let output: Vec<Value> = all
                .iter()
                .filter(|t| *types == "all" || types.split('+').any(|x| x == **t))
                .map(|t| json!({"type": t, "url": format!("{}/bulk-files/{t}.ndjson", data.base)}))
                .collect();
            return fhir_json(
                StatusCode::OK,
                &json!({
                    "transactionTime": "2026-03-02T00:00:00Z",
                    "request": format!("{}/Group/g1/$export", data.base),
                    "requiresAccessToken": true,
                    "output": output,
                    "error": [],
                }),
            );
        }
        ["bulk-files", file] => {
            let Some(t) = file.strip_suffix(".ndjson") else {
                return outcome(StatusCode::NOT_FOUND, "not-found", "no such file");
            };
            let mut body = String::new();
            for p in PATIENTS {
                for r in data.of_patient(t, p) {
                    body.push_str(&r.to_string());
                    body.push('\n');
                }
            }
            return (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/fhir+ndjson")],
                body,
            )
                .into_response();
        }
        _ => {}
    }
    if *method != Method::GET {
        return outcome(
            StatusCode::METHOD_NOT_ALLOWED,
            "not-supported",
            "only GET is supported",
        );
    }
    match segments.as_slice() {
        // Binary: only ever a Binary resource; the Accept picks the rendition.
        ["Binary", id] => match data.binaries.get(*id) {
            Some(renditions) => {
                let (ct, bytes) = pick(renditions, seen.accept.as_deref().unwrap_or(""));
                fhir_json(
                    StatusCode::OK,
                    &json!({"resourceType": "Binary", "id": id, "contentType": ct, "data": B64.encode(bytes)}),
                )
            }
            None => outcome(StatusCode::NOT_FOUND, "not-found", "no such Binary"),
        },
        [t, id] => match data.find(t, id) {
            Some(r) => fhir_json(StatusCode::OK, r),
            None => outcome(
                StatusCode::NOT_FOUND,
                "not-found",
                &format!("{t}/{id} is not known"),
            ),
        },
        [t] => {
            if param("_id").is_some() {
                return outcome(
                    StatusCode::BAD_REQUEST,
                    "not-supported",
                    "the _id search parameter is not supported",
                );
            }
            let Some(patient) = param("patient") else {
                return outcome(
                    StatusCode::BAD_REQUEST,
                    "required",
                    "a patient parameter is required",
                );
            };
            let found: Vec<Value> = data.of_patient(t, patient).cloned().collect();
            let self_url = &path_and_query_rel(&seen.path_and_query);
            fhir_json(StatusCode::OK, &searchset(&data.base, self_url, found))
        }
        _ => outcome(StatusCode::NOT_FOUND, "not-found", "unknown path"),
    }
}

fn path_and_query_rel(pq: &str) -> String {
    pq.strip_prefix("/fhir/").unwrap_or(pq).to_owned()
}
