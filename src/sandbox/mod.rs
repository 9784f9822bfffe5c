//! A built-in, Epic-compatible FHIR R4 sandbox server for demos, tests and benchmarks.
//!
//! [`Sandbox::start`] binds a real HTTP server (loopback by default) that behaves like Epic's
//! backend APIs as far as an exporting client can tell:
//!
//! - `GET {base}/.well-known/smart-configuration` and `GET {base}/metadata` (discovery);
//! - `POST /oauth2/token`: SMART Backend Services `client_credentials` with a `private_key_jwt`
//!   client assertion, verified with Epic's rules and answered with a reason-less
//!   `invalid_client` on any failure (the reason is only logged here, see `token.rs`);
//! - `GET {base}/Patient/{id}` and `GET {base}/{Type}?patient=...` searches over a deterministic
//!   synthetic data set (`data.rs`), with opaque `next` links, deliberately short pages,
//!   OperationOutcome entries and Epic's "Observation needs category or code" rule (`fhir.rs`);
//! - reads (`GET {base}/{Type}/{id}`) and `_id` searches of the resources patients share
//!   (Medication, Practitioner, PractitionerRole, Organization, Location; `catalogue.rs`);
//! - `GET {base}/Binary/{id}`: the attachments of clinical notes and lab reports, raw when the
//!   `Accept` header names one of their content types, else as a FHIR Binary resource
//!   (`binary.rs`, content from `documents.rs`), optionally also on the storage origin;
//! - FHIR Bulk Data export (`Group/{id}/$export`, `Patient/$export`, `$export`): kick-off,
//!   status polling with `X-Progress`, a manifest, streamed (optionally gzip) NDJSON files,
//!   DELETE, Epic's per-group throttle, and a second "storage" origin serving the same files
//!   through pre-signed URLs (`bulk.rs`);
//! - knobs for latency, random 429/503 answers and queued [`Fault`]s.
//!
//! It is not a general FHIR server: no writes, no `_include`, and only the search and export
//! parameters an exporter uses. The CLI wrapper lives in `cli.rs`; the PRNG and id helpers all
//! the generated data derives from are in `rng.rs`.

mod binary;
mod bulk;
mod catalogue;
mod cli;
mod data;
mod documents;
mod fhir;
mod rng;
mod token;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use jsonwebtoken::jwk::JwkSet;

pub use catalogue::CATALOGUE_TYPES;
pub use cli::{SandboxArgs, serve};
pub use data::{Dataset, SEARCH_TYPES};
pub use documents::BinaryDoc;

/// The FHIR base path, relative to the server origin (Epic's layout).
pub const FHIR_PATH: &str = "/api/FHIR/R4";
/// The token endpoint path, relative to the server origin (Epic's layout).
pub const TOKEN_PATH: &str = "/oauth2/token";
/// The id of the Group holding every sandbox patient (the shape of Epic's sandbox group id).
pub const SANDBOX_GROUP_ID: &str = "e3iabhmS8rsueyz7vaimuiaSmfGvi.QwjVXJANlPOgR83";

/// How to run a [`Sandbox`].
#[derive(Debug, Clone)]
pub struct SandboxOptions {
    /// Address to listen on; port 0 picks an ephemeral port. Default `127.0.0.1:0`.
    pub bind: SocketAddr,
    /// The origin clients reach the server at (e.g. `http://epic-sandbox.ns.svc:8080` behind a
    /// Kubernetes Service), used in SMART discovery, the token audience and `next` links. Default:
    /// the listening address (loopback when listening on all interfaces).
    pub public_origin: Option<String>,
    /// Number of synthetic patients. Default 10.
    pub patients: usize,
    /// Maximum entries per search page. Default 20.
    pub page_size: usize,
    /// Delay added before answering every FHIR (not token) request. Default 0.
    pub latency: Duration,
    /// `expires_in` and the real lifetime of issued access tokens. Default 3600 s.
    pub token_lifetime: Duration,
    /// Fraction of FHIR requests answered 429 with `Retry-After: 1`. Default 0.
    pub rate_429: f64,
    /// Fraction of FHIR requests answered 503. Default 0.
    pub rate_5xx: f64,
    /// Seed of the data set and of the random fault rolls. Default 42.
    pub seed: u64,
    /// Time from a Bulk Data kick-off until the export is complete (status polls answer 202
    /// before that). Default 2 s.
    pub bulk_delay: Duration,
    /// `Retry-After` value sent verbatim on 202 status answers; `None` sends no header.
    /// Default `Some("1")`.
    pub bulk_retry_after: Option<String>,
    /// Maximum resources per output file (Epic: 3,000); a type with more gets several files.
    /// Default 3000.
    pub bulk_file_size: usize,
    /// A client may kick off one export per group in this window (Epic's throttle);
    /// `Duration::ZERO` disables it. Default 24 h.
    pub bulk_throttle: Duration,
    /// Once an export is complete, its status URL and files answer 404 after this. Default 1 h.
    pub bulk_expiry: Duration,
    /// Whether manifests point at the storage origin's pre-signed URLs (and say
    /// `requiresAccessToken: false`) instead of the token-protected FHIR origin. Default false.
    pub bulk_files_on_storage: bool,
    /// Whether DocumentReference attachment URLs are absolute URLs on the storage origin,
    /// `{storage_origin}/notes/{binary id}` (served raw, without a token), instead of
    /// `Binary/{id}` relative to the FHIR base. DiagnosticReport `presentedForm` URLs stay
    /// `Binary/{id}`. Default false.
    pub attachments_on_storage: bool,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        SandboxOptions {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            public_origin: None,
            patients: 10,
            page_size: 20,
            latency: Duration::ZERO,
            token_lifetime: Duration::from_secs(3600),
            rate_429: 0.0,
            rate_5xx: 0.0,
            seed: 42,
            bulk_delay: Duration::from_secs(2),
            bulk_retry_after: Some("1".to_string()),
            bulk_file_size: 3000,
            bulk_throttle: Duration::from_secs(24 * 3600),
            bulk_expiry: Duration::from_secs(3600),
            bulk_files_on_storage: false,
            attachments_on_storage: false,
        }
    }
}

/// A backend client allowed to get tokens, like an app registration on Epic.
#[derive(Debug, Clone)]
pub struct ClientRegistration {
    pub client_id: String,
    pub keys: ClientKeys,
}

/// Where a client's public keys come from.
#[derive(Debug, Clone)]
pub enum ClientKeys {
    /// A JWK Set uploaded with the registration ("static keys").
    Jwks(JwkSet),
    /// A JWK Set URL (JKU) fetched on demand and cached per `Cache-Control` (29 h max).
    JwksUrl(String),
}

/// A scripted misbehaviour. Faults are queued FIFO; each one is taken by one request (token
/// requests never take faults).
///
/// The general faults (`Status`, `ForeignNextLink`, `RevokeTokens`) are taken in order by FHIR
/// requests, bulk ones included: `RevokeTokens` by the very next FHIR request, before
/// authentication, so that request gets a 401; the other two by the next *authenticated* FHIR
/// request (a 401 does not use them up). The Bulk Data faults wait in the queue for the next
/// request of their kind, letting other requests pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status (and `Retry-After` verbatim, if given) and an OperationOutcome.
    Status {
        status: u16,
        retry_after: Option<String>,
    },
    /// The request is served normally; the next search page served that has a `next` link gets
    /// that link moved to this origin (e.g. `http://127.0.0.1:5555`), same path and query.
    ForeignNextLink { origin: String },
    /// Invalidate every token issued so far, then serve the request normally (so it gets 401).
    RevokeTokens,
    /// The next bulk file download on the FHIR origin answers `307 Temporary Redirect` to the
    /// storage origin's pre-signed URL of that file.
    RedirectDownload,
    /// The next bulk file download (either origin) is sent uncompressed with the `Content-Length`
    /// of the whole body, but the connection is closed after `after_bytes` body bytes.
    DropDownload { after_bytes: u64 },
    /// The next manifest served states a `count` one too high for its first output file.
    WrongCount,
    /// The next bulk status poll answers `status` with an OperationOutcome issue of this `code`
    /// (e.g. 500 + `transient` for a retryable problem, 500 + `processing` for a failed job).
    PollOutcome { status: u16, code: String },
}

impl Fault {
    /// Whether any FHIR request takes this fault (as opposed to one kind of bulk request).
    fn is_general(&self) -> bool {
        matches!(
            self,
            Fault::Status { .. } | Fault::ForeignNextLink { .. } | Fault::RevokeTokens
        )
    }
}

/// Counters for assertions in tests and for the demo's summary.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SandboxStats {
    pub tokens_issued: u64,
    pub token_rejections: u64,
    pub fhir_requests: u64,
    pub unauthorized: u64,
    pub injected_faults: u64,
    pub random_faults: u64,
    /// Bulk kick-off requests that got past the token check and the general faults.
    pub bulk_kickoffs: u64,
    /// Bulk status polls (GET) that got past the token check and the general faults.
    pub bulk_polls: u64,
    /// Bulk file requests let in by a token (FHIR origin) or a valid signature (storage origin).
    pub bulk_downloads: u64,
    /// Bulk DELETE requests that got past the token check and the general faults.
    pub bulk_deletes: u64,
    /// Every request that reached the storage origin.
    pub storage_requests: u64,
    /// Storage-origin requests that carried an `Authorization` header (clients should not).
    pub storage_requests_with_authorization: u64,
    /// `GET {base}/Binary/{id}` requests that got past the token check and the general faults
    /// (unknown ids included).
    pub binary_reads: u64,
    /// Binary reads answered with the raw bytes (the `Accept` header named a content type of
    /// the Binary) rather than a FHIR Binary resource.
    pub binary_reads_raw: u64,
    /// Attachment downloads from the storage origin (`/notes/{id}`, known ids only).
    pub storage_attachment_downloads: u64,
    /// Reads (`GET {base}/{Type}/{id}`) of the shared catalogue types that got past the token
    /// check and the general faults, by type (unknown ids included).
    pub reads_by_type: BTreeMap<String, u64>,
    /// New `_id` searches of the catalogue types (`GET {base}/{Type}?_id=...`; further pages
    /// not counted).
    pub id_searches: u64,
    /// Ids asked for by those searches (after splitting comma lists; duplicates counted).
    pub id_search_ids: u64,
}

/// Why the sandbox could not start.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot read the local address of the listener bound to {addr}: {source}")]
    LocalAddr {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot build the HTTP client used to fetch JWK Set URLs: {0}")]
    HttpClient(#[source] reqwest::Error),
}

/// A running sandbox server. Dropping it without [`Sandbox::shutdown`] aborts the server task.
pub struct Sandbox {
    shared: Arc<Shared>,
    stop: Option<tokio::sync::watch::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Sandbox {
    /// Binds `opts.bind`, spawns the server and returns once it is listening.
    pub async fn start(opts: SandboxOptions) -> Result<Sandbox, SandboxError> {
        let (listener, local) = bind(opts.bind).await?;
        // The storage origin: same IP, another ephemeral port.
        let (storage_listener, storage_local) = bind(SocketAddr::new(opts.bind.ip(), 0)).await?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(SandboxError::HttpClient)?;
        let storage_origin = format!("http://{storage_local}");
        let mut dataset = Dataset::generate(opts.patients, opts.seed);
        if opts.attachments_on_storage {
            dataset = dataset
                .with_attachment_base(format!("{storage_origin}/{}", binary::STORAGE_NOTES_PATH));
        }
        let shared = Arc::new(Shared {
            origin: opts
                .public_origin
                .clone()
                .unwrap_or_else(|| format!("http://{local}")),
            storage_origin,
            dataset: Arc::new(dataset),
            http,
            inner: Mutex::new(Inner {
                rng: rng::SplitMix64::new(opts.seed ^ 0x5EED_FA17),
                ..Inner::default()
            }),
            wake_early_us: std::sync::atomic::AtomicI64::new(0),
            opts,
        });
        let app = router(shared.clone());
        let storage_app = Router::new()
            .route(
                &format!("/{}/{{id}}", binary::STORAGE_NOTES_PATH),
                get(binary::storage_note),
            )
            .fallback(bulk::storage_file)
            .with_state(shared.clone());
        let (stop, stopped) = tokio::sync::watch::channel(());
        let task = tokio::spawn(async move {
            // Like a production server: no Nagle delay on responses written in several pieces.
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let storage_listener = storage_listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            // Either the stop signal or the sender being dropped stops both servers.
            let until_stopped = |mut rx: tokio::sync::watch::Receiver<()>| async move {
                let _ = rx.changed().await;
            };
            let (served, storage_served) = tokio::join!(
                axum::serve(listener, app).with_graceful_shutdown(until_stopped(stopped.clone())),
                axum::serve(storage_listener, storage_app)
                    .with_graceful_shutdown(until_stopped(stopped)),
            );
            if let Err(e) = served {
                tracing::error!(error = %e, "sandbox server stopped with an error");
            }
            if let Err(e) = storage_served {
                tracing::error!(error = %e, "sandbox storage server stopped with an error");
            }
        });
        tracing::info!(base_url = %shared.base_url(), storage_origin = %shared.storage_origin, "sandbox listening");
        Ok(Sandbox {
            shared,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// The FHIR base URL, e.g. `http://127.0.0.1:PORT/api/FHIR/R4`.
    pub fn base_url(&self) -> String {
        self.shared.base_url()
    }

    /// The token endpoint, e.g. `http://127.0.0.1:PORT/oauth2/token` (the required `aud`).
    pub fn token_url(&self) -> String {
        self.shared.token_url()
    }

    /// The storage origin, e.g. `http://127.0.0.1:PORT2`: a second listener serving bulk files
    /// through pre-signed URLs and (with [`SandboxOptions::attachments_on_storage`]) note
    /// attachments at `/notes/{binary id}`, without tokens.
    pub fn storage_origin(&self) -> String {
        self.shared.storage_origin.clone()
    }

    /// Registers (or replaces) a client.
    pub fn register_client(&self, reg: ClientRegistration) {
        self.shared.lock().clients.insert(reg.client_id, reg.keys);
    }

    /// Queues a fault (FIFO).
    pub fn inject(&self, fault: Fault) {
        self.shared.lock().faults.push_back(fault);
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SandboxStats {
        self.shared.lock().stats.clone()
    }

    /// The synthetic data set being served.
    pub fn dataset(&self) -> &Dataset {
        &self.shared.dataset
    }

    /// Stops accepting connections, lets in-flight requests finish, and waits for the server.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Binds `addr`; returns the listener and the address clients should use to reach it.
async fn bind(addr: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr), SandboxError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| SandboxError::Bind { addr, source })?;
    let mut local = listener
        .local_addr()
        .map_err(|source| SandboxError::LocalAddr { addr, source })?;
    if local.ip().is_unspecified() {
        // Listening on all interfaces: advertise loopback, which always reaches us.
        local.set_ip(if local.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    Ok((listener, local))
}

fn router(shared: Arc<Shared>) -> Router {
    // The FHIR and Bulk Data requests answer `latency` after they arrive (the server's work included).
    let data = Router::new()
        .route(&format!("{FHIR_PATH}/$export"), get(bulk::kickoff_system))
        .route(
            &format!("{FHIR_PATH}/Patient/$export"),
            get(bulk::kickoff_patient),
        )
        .route(
            &format!("{FHIR_PATH}/Group/{{id}}/$export"),
            get(bulk::kickoff_group),
        )
        .route(
            &format!("{FHIR_PATH}/{}/{{job}}", bulk::STATUS_PATH),
            get(bulk::status).delete(bulk::delete),
        )
        .route(
            &format!("{FHIR_PATH}/{}/{{job}}/{{n}}", bulk::FILE_PATH),
            get(bulk::file),
        )
        .route(&format!("{FHIR_PATH}/Binary/{{id}}"), get(binary::read))
        .route(&format!("{FHIR_PATH}/{{resource_type}}"), get(fhir::search))
        .route(
            &format!("{FHIR_PATH}/{{resource_type}}/{{id}}"),
            get(fhir::read),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            fhir::emulate_latency,
        ));
    Router::new()
        .route(
            &format!("{FHIR_PATH}/.well-known/smart-configuration"),
            get(token::smart_configuration),
        )
        .route(&format!("{FHIR_PATH}/metadata"), get(fhir::metadata))
        .route(TOKEN_PATH, post(token::token_endpoint))
        .merge(data)
        .fallback(fhir::not_found)
        .layer(axum::middleware::map_response(request_id))
        .with_state(shared)
}

/// Every answer carries an `X-Request-Id` (`sandbox-<n>`), like servers whose support asks for one.
async fn request_id(mut resp: axum::response::Response) -> axum::response::Response {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if let Ok(v) = axum::http::HeaderValue::from_str(&format!("sandbox-{n}")) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// State shared by all handlers.
pub(crate) struct Shared {
    opts: SandboxOptions,
    /// `http://host:port`, as clients reach us.
    origin: String,
    /// `http://host:port2` of the storage listener (pre-signed bulk file URLs).
    storage_origin: String,
    dataset: Arc<Dataset>,
    http: reqwest::Client,
    inner: Mutex<Inner>,
    /// How much earlier than due the latency's sleeps end, in microseconds: learnt from how late
    /// they wake up (see `fhir::emulate_latency`).
    wake_early_us: std::sync::atomic::AtomicI64,
}

impl Shared {
    fn base_url(&self) -> String {
        format!("{}{FHIR_PATH}", self.origin)
    }

    fn token_url(&self) -> String {
        format!("{}{TOKEN_PATH}", self.origin)
    }

    /// Locks the mutable state. Never held across an `.await`; a poisoned lock is recovered
    /// because every update leaves the maps consistent.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Mutable server state, behind one lock.
#[derive(Default)]
struct Inner {
    clients: HashMap<String, ClientKeys>,
    /// JWK Set URL → (keys, cached until).
    jwks_cache: HashMap<String, (JwkSet, Instant)>,
    /// (client id, jti) → the assertion's `exp` (Unix seconds).
    seen_jti: HashMap<(String, String), i64>,
    /// access token → (expiry, client id).
    tokens: HashMap<String, (Instant, String)>,
    faults: VecDeque<Fault>,
    /// Origins waiting for the next page that has a `next` link.
    foreign_origins: VecDeque<String>,
    sessions: HashMap<String, fhir::Session>,
    /// Bulk export jobs by id.
    bulk_jobs: HashMap<String, bulk::Job>,
    /// (client id, group id or `*`) → the last accepted kick-off (Epic's throttle).
    bulk_last_kickoff: HashMap<(String, String), Instant>,
    rng: rng::SplitMix64,
    stats: SandboxStats,
}

#[cfg(test)]
mod tests;
