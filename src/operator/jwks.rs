//! The JWK Set endpoint (`epic-export jwks-server`): the public keys of the exports, for Epic (or any
//! SMART server) to fetch from the JWK Set URL registered for the app.
//!
//! - `GET /jwks/<namespace>/<export>.json`: the keys the controller published in that EpicExport's
//!   `status.publicKeys` (the signing key, and during a rotation the next or the retiring key).
//! - `GET /jwks/<namespace>/secrets/<secret>.json`: the keys of every EpicExport of that namespace whose
//!   key Secret it is (each key once, by `kid`).
//!
//! It answers from its cache of EpicExports (a watch), never from anything else: a request makes no
//! API call at all, so nothing fans out, and the process needs no access to Secrets (its RBAC is
//! get/list/watch on EpicExports). The controller derives the public keys from the key Secrets and
//! writes them into the status (only public members have a field there). Unauthenticated by design
//! (Epic fetches it anonymously), on a port of its own: anything but the two forms above is 404, and so
//! is an export without published keys or a Secret no export uses. Responses carry `Cache-Control:
//! public, max-age=N` (shorter while a rotation publishes a next or retiring key), a strong `ETag`, and
//! answer `If-None-Match` with 304. `/healthz` and `/readyz` are served on a separate address.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::crd::{EpicExport, PublicJwk, PublicKeys};

/// What the endpoint tells its clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JwksSettings {
    /// `Cache-Control: max-age` outside rotations.
    pub max_age: Duration,
    /// `Cache-Control: max-age` while a next or retiring key is published.
    pub rotation_max_age: Duration,
}

impl Default for JwksSettings {
    fn default() -> Self {
        JwksSettings {
            max_age: Duration::from_secs(3600),
            rotation_max_age: Duration::from_secs(300),
        }
    }
}

/// One JWK Set response.
#[derive(Clone, Debug)]
struct Document {
    body: bytes::Bytes,
    etag: String,
    max_age: Duration,
}

/// The endpoint's Prometheus metrics (served on its health port's `/metrics`):
/// `epic_export_jwks_requests_total{result}`, for the JWK Set requests (`/jwks/<ns>/...json`) by
/// result: `ok`, `not_modified`, `not_found` (no keys published for that export or Secret: a client,
/// e.g. Epic, asks for keys that are not there) and `unavailable` (the cache is not filled yet).
pub struct JwksMetrics {
    registry: prometheus_client::registry::Registry,
    requests: Family<ResultLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

impl Default for JwksMetrics {
    fn default() -> Self {
        let mut registry = prometheus_client::registry::Registry::with_prefix("epic_export_jwks");
        let requests = Family::<ResultLabels, Counter>::default();
        registry.register(
            "requests",
            "JWK Set requests by result (ok, not_modified, not_found, unavailable)",
            requests.clone(),
        );
        // Every result is in the exposition from the start (0), so rates see the first request.
        for result in ["ok", "not_modified", "not_found", "unavailable"] {
            let _ = requests.get_or_create(&ResultLabels { result });
        }
        JwksMetrics { registry, requests }
    }
}

impl JwksMetrics {
    /// The Prometheus/OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    fn count(&self, result: &'static str) {
        self.requests.get_or_create(&ResultLabels { result }).inc();
    }
}

/// The endpoint's state: the EpicExport cache.
pub struct Publisher {
    exports: Store<EpicExport>,
    settings: JwksSettings,
    metrics: Arc<JwksMetrics>,
}

impl Publisher {
    pub fn new(exports: Store<EpicExport>, settings: JwksSettings) -> Publisher {
        Publisher::with_metrics(exports, settings, Arc::default())
    }

    pub fn with_metrics(
        exports: Store<EpicExport>,
        settings: JwksSettings,
        metrics: Arc<JwksMetrics>,
    ) -> Publisher {
        Publisher {
            exports,
            settings,
            metrics,
        }
    }

    /// The document for `/jwks/<ns>/<export>.json`.
    fn for_export(&self, ns: &str, name: &str) -> Option<Document> {
        let export = self.exports.get(&ObjectRef::new(name).within(ns))?;
        let keys = published(&export)?;
        // An export's set holds more than the signing key only during a rotation.
        self.document(&keys.keys, keys.keys.len() > 1)
    }

    /// The document for `/jwks/<ns>/secrets/<secret>.json`.
    fn for_secret(&self, ns: &str, secret: &str) -> Option<Document> {
        let mut exports: Vec<Arc<EpicExport>> = self
            .exports
            .state()
            .into_iter()
            .filter(|e| e.namespace().as_deref() == Some(ns))
            .filter(|e| e.spec.auth.key_secret_ref.name == secret)
            .collect();
        // The same order whatever the cache's: the same bytes, the same ETag.
        exports.sort_by_key(|e| e.name_any());
        let mut keys: Vec<PublicJwk> = Vec::new();
        let mut rotating = false;
        for set in exports.iter().filter_map(|e| published(e)) {
            rotating |= set.keys.len() > 1;
            for key in &set.keys {
                if !keys.iter().any(|k| k.kid == key.kid) {
                    keys.push(key.clone());
                }
            }
        }
        self.document(&keys, rotating)
    }

    fn document(&self, keys: &[PublicJwk], rotating: bool) -> Option<Document> {
        if keys.is_empty() {
            return None;
        }
        let body = serde_json::to_vec(&PublicKeys {
            keys: keys.to_vec(),
        })
        .ok()?;
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &body);
        let etag = format!("\"{}\"", crate::text::hex(&digest.as_ref()[..16]));
        Some(Document {
            body: body.into(),
            etag,
            max_age: if rotating {
                self.settings.rotation_max_age
            } else {
                self.settings.max_age
            },
        })
    }

    fn exports_ready(&self) -> bool {
        // The store is filled by its watch; until the first list it knows no export.
        use futures::FutureExt;
        self.exports.wait_until_ready().now_or_never().is_some()
    }
}

/// The keys an export's status publishes, if any.
fn published(export: &EpicExport) -> Option<&PublicKeys> {
    export
        .status
        .as_ref()?
        .public_keys
        .as_ref()
        .filter(|k| !k.keys.is_empty())
}

/// The endpoint's routes.
pub fn router(publisher: Arc<Publisher>) -> Router {
    Router::new()
        .route("/jwks/{ns}/{file}", get(export_jwks))
        .route("/jwks/{ns}/secrets/{file}", get(secret_jwks))
        .fallback(|| async { not_found() })
        .with_state(publisher)
}

/// Which document a path asks for.
#[derive(Clone, Copy)]
enum Form {
    Export,
    Secret,
}

async fn export_jwks(
    State(publisher): State<Arc<Publisher>>,
    Path((ns, file)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    answer(&publisher, Form::Export, &ns, &file, &headers)
}

async fn secret_jwks(
    State(publisher): State<Arc<Publisher>>,
    Path((ns, file)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    answer(&publisher, Form::Secret, &ns, &file, &headers)
}

fn answer(
    publisher: &Publisher,
    form: Form,
    ns: &str,
    file: &str,
    headers: &HeaderMap,
) -> Response {
    let Some(name) = file.strip_suffix(".json") else {
        return not_found();
    };
    if !publisher.exports_ready() {
        publisher.metrics.count("unavailable");
        return unavailable();
    }
    let document = match form {
        Form::Export => publisher.for_export(ns, name),
        Form::Secret => publisher.for_secret(ns, name),
    };
    match document {
        Some(d) => respond(d, headers, &publisher.metrics),
        None => {
            publisher.metrics.count("not_found");
            not_found()
        }
    }
}

fn respond(document: Document, headers: &HeaderMap, metrics: &JwksMetrics) -> Response {
    let cache_control = format!("public, max-age={}", document.max_age.as_secs());
    let etag = HeaderValue::from_str(&document.etag).expect("hex ETag is a header value");
    let cache_headers = [
        (
            header::CACHE_CONTROL,
            HeaderValue::from_str(&cache_control).expect("ascii"),
        ),
        (header::ETAG, etag),
    ];
    let matches = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim() == document.etag || t.trim() == "*");
    if matches {
        metrics.count("not_modified");
        return (StatusCode::NOT_MODIFIED, cache_headers).into_response();
    }
    metrics.count("ok");
    (
        StatusCode::OK,
        cache_headers,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        document.body,
    )
        .into_response()
}

fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        [(header::CACHE_CONTROL, "no-store")],
        "not found\n",
    )
        .into_response()
}

fn unavailable() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::RETRY_AFTER, "5"),
        ],
        "JWKS not available yet\n",
    )
        .into_response()
}

/// Watches EpicExports (in `namespace`, or all) and serves the endpoint on `listener` until the task
/// is dropped. `ready` is set once the EpicExport cache is filled (for `/readyz`).
pub async fn serve(
    client: Client,
    namespace: Option<String>,
    listener: tokio::net::TcpListener,
    settings: JwksSettings,
    ready: Arc<AtomicBool>,
) -> std::io::Result<()> {
    serve_with_metrics(client, namespace, listener, settings, ready, Arc::default()).await
}

/// [`serve`], counting the requests in `metrics`.
pub async fn serve_with_metrics(
    client: Client,
    namespace: Option<String>,
    listener: tokio::net::TcpListener,
    settings: JwksSettings,
    ready: Arc<AtomicBool>,
    metrics: Arc<JwksMetrics>,
) -> std::io::Result<()> {
    use futures::StreamExt;
    let (reader, watch) = super::exports::reflector(client, namespace.as_deref());
    let watch = watch.for_each(|event| async move {
        if let Err(e) = event {
            tracing::warn!("JWKS: EpicExport watch failed, retrying: {e}");
        }
    });
    let _watch = crate::task::AbortOnDrop(tokio::spawn(watch));
    let _ready = crate::task::AbortOnDrop(tokio::spawn(super::exports::mark_ready(
        reader.clone(),
        ready,
        "JWKS: ",
    )));
    let publisher = Arc::new(Publisher::with_metrics(reader, settings, metrics));
    axum::serve(listener, router(publisher)).await
}
