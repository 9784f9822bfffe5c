//! A deliberately hostile FHIR server for the trust-boundary tests: a real HTTP server on loopback
//! whose token endpoint, search pages, Bulk Data kick-off, status and manifest lie in the ways a
//! compromised or broken server (or anything between us and it) could. A second server on another
//! origin (`elsewhere`) records every request, so a test can prove the access token never went there.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Value, json};

/// The access token the hostile token endpoint hands out (tests look for it where it must not be).
pub const TOKEN: &str = "hostile-access-token-7f3a9c";

/// How the server lies.
#[derive(Clone, Debug)]
pub enum Lie {
    /// The token answer is this JSON (e.g. `expires_in: 1e300`); searches then answer honestly.
    TokenAnswer(Value),
    /// A search page with a Condition and a resource whose type is `resource_type`.
    SearchType { resource_type: String },
    /// A search page whose `next` link points at the `elsewhere` origin.
    ForeignNext,
    /// Every search answers `status` with an endless (streamed) body.
    HugeErrors { status: u16 },
    /// Every search answers 200 with an endless body.
    EndlessPage,
    /// The smart-configuration names this token endpoint (`{elsewhere}` is replaced).
    Discovery { token_endpoint: String },
    /// The smart-configuration is an endless document.
    EndlessDiscovery,
    /// The bulk manifest lists files of these `(list, type)`s (`output`, `error`, `deleted`).
    ManifestTypes(Vec<(&'static str, String)>),
    /// The kick-off's Content-Location is on the `elsewhere` origin.
    ForeignStatusUrl,
    /// The status URL answers 200 with an endless manifest.
    EndlessManifest,
    /// Bulk files answer 403 with an OperationOutcome whose diagnostics talk about a patient.
    FileErrorAboutAPatient,
}

/// The free text of `Lie::FileErrorAboutAPatient` (must never leave the run folder).
pub const PATIENT_TEXT: &str = "access to Jane Q. Doe (MRN 0042) is restricted";

/// One request the servers saw.
#[derive(Clone, Debug)]
pub struct Seen {
    pub server: &'static str,
    pub method: String,
    pub path_and_query: String,
    pub authorization: Option<String>,
}

#[derive(Clone)]
struct Shared {
    lie: Lie,
    name: &'static str,
    base: String,
    elsewhere: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

pub struct Hostile {
    pub addr: SocketAddr,
    pub elsewhere: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Hostile {
    pub async fn start(lie: Lie) -> Hostile {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let fhir = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let other = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, elsewhere) = (fhir.local_addr().unwrap(), other.local_addr().unwrap());
        let base = format!("http://{addr}/fhir");
        let elsewhere_url = format!("http://{elsewhere}");
        for (listener, name) in [(fhir, "fhir"), (other, "elsewhere")] {
            let shared = Shared {
                lie: lie.clone(),
                name,
                base: base.clone(),
                elsewhere: elsewhere_url.clone(),
                seen: seen.clone(),
            };
            let app = Router::new().fallback(handle).with_state(shared);
            tokio::spawn(async move { axum::serve(listener, app).await });
        }
        Hostile {
            addr,
            elsewhere,
            seen,
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/fhir", self.addr)
    }

    pub fn token_url(&self) -> String {
        format!("http://{}/oauth2/token", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Requests that reached the other origin.
    pub fn seen_elsewhere(&self) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.server == "elsewhere")
            .collect()
    }
}

/// An endless body of `chunk` repeated.
fn endless(chunk: &'static [u8]) -> Body {
    let stream =
        futures::stream::repeat_with(move || Ok::<_, std::io::Error>(Bytes::from_static(chunk)));
    Body::from_stream(stream)
}

const JSON_CHUNK: &[u8] = &[b' '; 64 * 1024];

fn fhir_json(status: StatusCode, v: Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/fhir+json")],
        v.to_string(),
    )
        .into_response()
}

fn bundle(entries: Vec<Value>, next: Option<String>) -> Value {
    let mut link = vec![json!({"relation": "self", "url": "x"})];
    if let Some(n) = next {
        link.push(json!({"relation": "next", "url": n}));
    }
    json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "link": link,
        "entry": entries.into_iter().map(|r| json!({"resource": r, "search": {"mode": "match"}})).collect::<Vec<_>>(),
    })
}

async fn handle(State(s): State<Shared>, headers: HeaderMap, req: Request) -> Response {
    let method = req.method().to_string();
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    s.seen.lock().unwrap().push(Seen {
        server: s.name,
        method: method.clone(),
        path_and_query: path_and_query.clone(),
        authorization: headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    });
    if s.name == "elsewhere" {
        // Whatever it is asked, it answers like a willing FHIR server would.
        return fhir_json(StatusCode::OK, bundle(vec![], None));
    }
    let path = req.uri().path().to_owned();
    let lie = &s.lie;
    if path == "/fhir/.well-known/smart-configuration" {
        return match lie {
            Lie::Discovery { token_endpoint } => fhir_json(
                StatusCode::OK,
                json!({"token_endpoint": token_endpoint.replace("{elsewhere}", &s.elsewhere)}),
            ),
            Lie::EndlessDiscovery => (StatusCode::OK, endless(JSON_CHUNK)).into_response(),
            _ => fhir_json(
                StatusCode::OK,
                json!({"token_endpoint": format!("{}/../oauth2/token", s.base)}),
            ),
        };
    }
    if path == "/oauth2/token" {
        let answer = match lie {
            Lie::TokenAnswer(v) => v.clone(),
            _ => json!({"access_token": TOKEN, "token_type": "Bearer", "expires_in": 3600}),
        };
        return (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            answer.to_string(),
        )
            .into_response();
    }
    if headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        != Some(&format!("Bearer {TOKEN}"))
    {
        return fhir_json(
            StatusCode::UNAUTHORIZED,
            json!({"resourceType": "OperationOutcome"}),
        );
    }
    let condition =
        json!({"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1"}});
    match (lie, path.as_str()) {
        (_, "/fhir/Patient/p1") => fhir_json(
            StatusCode::OK,
            json!({"resourceType": "Patient", "id": "p1"}),
        ),
        (Lie::SearchType { resource_type }, "/fhir/Condition") => fhir_json(
            StatusCode::OK,
            bundle(
                vec![
                    condition,
                    json!({"resourceType": resource_type, "id": "x1"}),
                ],
                None,
            ),
        ),
        (Lie::ForeignNext, "/fhir/Condition") => fhir_json(
            StatusCode::OK,
            bundle(
                vec![condition],
                Some(format!("{}/fhir/Condition?page=2", s.elsewhere)),
            ),
        ),
        (Lie::HugeErrors { status }, "/fhir/Condition") => (
            StatusCode::from_u16(*status).unwrap(),
            [(header::CONTENT_TYPE, "application/fhir+json")],
            endless(JSON_CHUNK),
        )
            .into_response(),
        (Lie::EndlessPage, "/fhir/Condition") => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/fhir+json")],
            endless(JSON_CHUNK),
        )
            .into_response(),
        (_, "/fhir/Condition") => fhir_json(StatusCode::OK, bundle(vec![condition], None)),
        (_, "/fhir/Group/g1/$export") => {
            let location = match lie {
                Lie::ForeignStatusUrl => format!("{}/status/1", s.elsewhere),
                _ => format!("{}/status/1", s.base),
            };
            (
                StatusCode::ACCEPTED,
                [(header::CONTENT_LOCATION, location)],
                "",
            )
                .into_response()
        }
        (Lie::EndlessManifest, "/fhir/status/1") => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            endless(JSON_CHUNK),
        )
            .into_response(),
        (_, "/fhir/status/1") => {
            let files: Vec<(&str, String)> = match lie {
                Lie::ManifestTypes(files) => files.clone(),
                _ => vec![("output", "Condition".to_owned())],
            };
            let mut manifest = json!({
                "transactionTime": "2026-12-01T00:00:00Z",
                "request": format!("{}/Group/g1/$export", s.base),
                "requiresAccessToken": true,
                "output": [], "error": [], "deleted": [],
            });
            for (i, (list, t)) in files.iter().enumerate() {
                manifest[*list]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"type": t, "url": format!("{}/files/{i}.ndjson", s.base)}));
            }
            fhir_json(StatusCode::OK, manifest)
        }
        (Lie::FileErrorAboutAPatient, p) if p.starts_with("/fhir/files/") => fhir_json(
            StatusCode::FORBIDDEN,
            json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "security", "diagnostics": PATIENT_TEXT}]}),
        ),
        (_, p) if p.starts_with("/fhir/files/") => {
            // Every file holds one line that is valid for nothing in particular.
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/fhir+ndjson")],
                "{\"resourceType\":\"Condition\",\"id\":\"c1\"}\n",
            )
                .into_response()
        }
        _ if method == "DELETE" => StatusCode::ACCEPTED.into_response(),
        _ => fhir_json(
            StatusCode::NOT_FOUND,
            json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-found"}]}),
        ),
    }
}
