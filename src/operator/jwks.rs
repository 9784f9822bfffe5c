//! The operator's JWK Set endpoint: the public keys of the exports' key Secrets, for Epic (or any
//! SMART server) to fetch from the JWK Set URL registered for the app.
//!
//! - `GET /jwks/<namespace>/<export>.json`: the keys of that export's key Secret (the signing key, and
//!   during a rotation the next or the retiring key), with the export's `keyId` and algorithm.
//! - `GET /jwks/<namespace>/secrets/<secret>.json`: the keys of a key Secret that at least one export
//!   refers to (thumbprint key ids).
//!
//! Served on its own port, without authentication (Epic fetches it anonymously), in every replica
//! (standbys too): it only reads. Anything else is 404, and so is an export or Secret that does not
//! exist or is not a key Secret; unknown names never reach the API server. A Secret is read at most
//! once per `refresh` interval whatever the traffic; only public members are derived and kept, never
//! the private key. Responses carry `Cache-Control: public, max-age=N` (shorter while a rotation is
//! under way), a strong `ETag`, and answer `If-None-Match` with 304.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

use super::crd::EpicExport;
use super::key_secret::{self, Signing};

/// How the endpoint caches and what it tells its clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JwksSettings {
    /// `Cache-Control: max-age` outside rotations.
    pub max_age: Duration,
    /// `Cache-Control: max-age` while a next or retiring key is published.
    pub rotation_max_age: Duration,
    /// How long a Secret read is reused.
    pub refresh: Duration,
}

impl Default for JwksSettings {
    fn default() -> Self {
        JwksSettings {
            max_age: Duration::from_secs(3600),
            rotation_max_age: Duration::from_secs(300),
            refresh: Duration::from_secs(10),
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

/// The keys wanted from one Secret: `(data key, how the export signs)`.
type Wanted = Vec<(String, Option<String>, Option<String>)>;

struct Cached {
    fetched: Instant,
    wanted: Wanted,
    /// `None`: the Secret or its keys are not there (404).
    document: Option<Document>,
}

/// The endpoint's state: the EpicExport cache and the documents.
pub struct Publisher {
    client: Client,
    exports: Store<EpicExport>,
    settings: JwksSettings,
    cache: Mutex<HashMap<(String, String, &'static str), Cached>>,
    /// One Secret read at a time (the endpoint is public: no request may fan out).
    reading: tokio::sync::Mutex<()>,
}

impl Publisher {
    pub fn new(client: Client, exports: Store<EpicExport>, settings: JwksSettings) -> Publisher {
        Publisher {
            client,
            exports,
            settings,
            cache: Mutex::default(),
            reading: tokio::sync::Mutex::new(()),
        }
    }

    /// The document for `/jwks/<ns>/<export>.json`.
    async fn for_export(&self, ns: &str, name: &str) -> Result<Option<Document>, Unavailable> {
        let Some(export) = self.exports.get(&ObjectRef::new(name).within(ns)) else {
            return Ok(None);
        };
        let auth = &export.spec.auth;
        let wanted = vec![(
            auth.key_secret_ref.key.clone(),
            auth.algorithm.clone(),
            auth.key_id.clone(),
        )];
        self.document(ns, &auth.key_secret_ref.name, "export", wanted)
            .await
    }

    /// The document for `/jwks/<ns>/secrets/<secret>.json`.
    async fn for_secret(&self, ns: &str, secret: &str) -> Result<Option<Document>, Unavailable> {
        let mut wanted: Wanted = self
            .exports
            .state()
            .iter()
            .filter(|e| e.namespace().as_deref() == Some(ns))
            .map(|e| &e.spec.auth)
            .filter(|a| a.key_secret_ref.name == secret)
            .map(|a| (a.key_secret_ref.key.clone(), a.algorithm.clone(), None))
            .collect();
        if wanted.is_empty() {
            return Ok(None);
        }
        wanted.sort();
        wanted.dedup_by(|a, b| a.0 == b.0);
        self.document(ns, secret, "secret", wanted).await
    }

    async fn document(
        &self,
        ns: &str,
        secret: &str,
        form: &'static str,
        wanted: Wanted,
    ) -> Result<Option<Document>, Unavailable> {
        let id = (ns.to_owned(), secret.to_owned(), form);
        if let Some(doc) = self.fresh(&id, &wanted) {
            return Ok(doc);
        }
        let _reading = self.reading.lock().await;
        if let Some(doc) = self.fresh(&id, &wanted) {
            return Ok(doc);
        }
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let document = match secrets.get_opt(secret).await {
            Ok(found) => found.and_then(|s| self.build(&s, ns, &wanted)),
            Err(e) => {
                tracing::warn!("JWKS: cannot read Secret {ns}/{secret}: {e}");
                // Keep serving what was published rather than fail Epic's fetch.
                let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                return match cache.get(&id) {
                    Some(c) if c.wanted == wanted => Ok(c.document.clone()),
                    _ => Err(Unavailable),
                };
            }
        };
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).insert(
            id,
            Cached {
                fetched: Instant::now(),
                wanted,
                document: document.clone(),
            },
        );
        Ok(document)
    }

    fn fresh(
        &self,
        id: &(String, String, &'static str),
        wanted: &Wanted,
    ) -> Option<Option<Document>> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(id)
            .filter(|c| c.wanted == *wanted && c.fetched.elapsed() < self.settings.refresh)
            .map(|c| c.document.clone())
    }

    /// The public keys of the wanted slots, the signing keys first; `None` when a key is missing or
    /// unusable (the export cannot sign either, so there is nothing right to publish).
    fn build(&self, secret: &Secret, ns: &str, wanted: &Wanted) -> Option<Document> {
        let mut keys: Vec<Value> = Vec::new();
        let mut rotating = false;
        for (key, algorithm, key_id) in wanted {
            let signing = Signing {
                algorithm: algorithm.as_deref().and_then(|a| a.parse().ok()),
                key_id: key_id.clone(),
            };
            let set = match key_secret::read(secret, key, &signing) {
                Ok(set) => set,
                Err(e) => {
                    tracing::warn!("JWKS: Secret {ns}/{}: {e}", secret.name_any());
                    return None;
                }
            };
            rotating |= set.rotating();
            for jwk in set.keys() {
                if !keys.iter().any(|k| k["kid"] == jwk["kid"]) {
                    keys.push(jwk.clone());
                }
            }
        }
        let body = serde_json::to_vec(&json!({ "keys": keys })).ok()?;
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &body);
        let etag = format!(
            "\"{}\"",
            digest.as_ref()[..16]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
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
}

/// The API server could not be read and nothing was published before.
struct Unavailable;

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
    answer(&publisher, Form::Export, &ns, &file, &headers).await
}

async fn secret_jwks(
    State(publisher): State<Arc<Publisher>>,
    Path((ns, file)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    answer(&publisher, Form::Secret, &ns, &file, &headers).await
}

async fn answer(
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
        return unavailable();
    }
    let document = match form {
        Form::Export => publisher.for_export(ns, name).await,
        Form::Secret => publisher.for_secret(ns, name).await,
    };
    respond(document, headers)
}

impl Publisher {
    fn exports_ready(&self) -> bool {
        // The store is filled by its watch; until the first list it knows no export.
        use futures::FutureExt;
        self.exports.wait_until_ready().now_or_never().is_some()
    }
}

fn respond(document: Result<Option<Document>, Unavailable>, headers: &HeaderMap) -> Response {
    let document = match document {
        Ok(Some(d)) => d,
        Ok(None) => return not_found(),
        Err(Unavailable) => return unavailable(),
    };
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
        return (StatusCode::NOT_MODIFIED, cache_headers).into_response();
    }
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
/// is dropped.
pub async fn serve(
    client: Client,
    namespace: Option<String>,
    listener: tokio::net::TcpListener,
    settings: JwksSettings,
) -> std::io::Result<()> {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, reflector, watcher};
    let api: Api<EpicExport> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let (reader, writer) = reflector::store();
    let watch = reflector(
        writer,
        watcher(api, watcher::Config::default().any_semantic()),
    )
    .default_backoff()
    .for_each(|event| async move {
        if let Err(e) = event {
            tracing::warn!("JWKS: EpicExport watch failed, retrying: {e}");
        }
    });
    let _watch = crate::task::AbortOnDrop(tokio::spawn(watch));
    let publisher = Arc::new(Publisher::new(client, reader, settings));
    axum::serve(listener, router(publisher)).await
}
