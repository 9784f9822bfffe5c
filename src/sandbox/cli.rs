//! The `sandbox` subcommand: clap arguments and [`serve`], which runs a [`Sandbox`] until
//! Ctrl-C or SIGTERM. Only argument handling lives here; the server is in `mod.rs`.

use std::net::SocketAddr;
use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;

use super::{ClientKeys, ClientRegistration, Sandbox, SandboxError, SandboxOptions};

/// What is wrong with the `sandbox` command's arguments, or why the sandbox could not start.
#[derive(Debug, thiserror::Error)]
pub enum SandboxArgsError {
    #[error("--rate-429 plus --rate-5xx must not exceed 1")]
    Rates,
    #[error("{0} is too large")]
    TooLarge(&'static str),
    #[error("--client {spec}: {problem}")]
    Client { spec: String, problem: &'static str },
    #[error("--client {client_id}: `{url}` is not a valid URL: {source}")]
    ClientUrl {
        client_id: String,
        url: String,
        source: url::ParseError,
    },
    #[error("--client: JWKS file {path}: cannot read it: {source}")]
    JwksRead {
        path: String,
        source: std::io::Error,
    },
    #[error("--client: JWKS file {path}: not a JWK Set (JSON with a `keys` array): {source}")]
    JwksParse {
        path: String,
        source: serde_json::Error,
    },
    #[error("--bind {bind}: cannot start the sandbox: {source}")]
    Start {
        bind: SocketAddr,
        source: SandboxError,
    },
    #[error("--write-roster {path}: cannot write it: {source}")]
    WriteRoster {
        path: String,
        source: std::io::Error,
    },
}

/// A value clap refuses, with what to write instead.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidValue(String);

/// Run the built-in Epic-compatible FHIR sandbox.
#[derive(clap::Args, Debug, Clone)]
pub struct SandboxArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub bind: SocketAddr,
    /// The URL clients reach the sandbox at, when not the listening address (e.g. behind a
    /// Kubernetes Service: `http://epic-sandbox.my-namespace.svc:8080`). Used in SMART discovery,
    /// as the token audience and in `next` links.
    #[arg(long, value_name = "URL", value_parser = parse_public_url)]
    pub public_url: Option<String>,
    /// Number of synthetic patients.
    #[arg(long, default_value_t = 10)]
    pub patients: usize,
    /// Maximum entries per search page (every second page is half as long).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub page_size: u64,
    /// Delay added before answering every FHIR request, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Lifetime of issued access tokens, in seconds.
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
    pub token_lifetime_secs: u64,
    /// Fraction (0 to 1) of FHIR requests answered 429.
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub rate_429: f64,
    /// Fraction (0 to 1) of FHIR requests answered 503.
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub rate_5xx: f64,
    /// Seed of the synthetic data and of the random faults.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Register a client: `CLIENT_ID=JWKS` where JWKS is a JWK Set JSON file (static keys) or an
    /// http(s) JWK Set URL. Repeat for more clients.
    #[arg(long = "client", value_name = "CLIENT_ID=JWKS_FILE_OR_URL")]
    pub clients: Vec<String>,
    /// Bulk Data: milliseconds from kick-off until the export is complete.
    #[arg(long, default_value_t = 2000)]
    pub bulk_delay_ms: u64,
    /// Bulk Data: `Retry-After` sent on 202 status answers (an empty value sends none).
    #[arg(long, default_value = "1")]
    pub bulk_retry_after: String,
    /// Bulk Data: maximum resources per output file.
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(1..))]
    pub bulk_file_size: u64,
    /// Bulk Data: seconds during which a client may kick off one export per group (0: no limit).
    #[arg(long, default_value_t = 86_400)]
    pub bulk_throttle_secs: u64,
    /// Bulk Data: seconds a completed export stays available.
    #[arg(long, default_value_t = 3600)]
    pub bulk_expiry_secs: u64,
    /// Bulk Data: point manifests at pre-signed URLs on the storage origin (no token).
    #[arg(long)]
    pub bulk_files_on_storage: bool,
    /// Point DocumentReference attachment URLs at the storage origin (`/notes/{id}`, no token)
    /// instead of `Binary/{id}`.
    #[arg(long)]
    pub attachments_on_storage: bool,
    /// Write the synthetic patients' ids to this roster CSV (`patient_id` column) for `epic-export run`.
    #[arg(long, value_name = "FILE")]
    pub write_roster: Option<std::path::PathBuf>,
}

/// An http(s) origin (scheme, host, optional port; no path), without a trailing slash.
fn parse_public_url(s: &str) -> Result<String, InvalidValue> {
    let url = url::Url::parse(s).map_err(|e| InvalidValue(format!("`{s}` is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(InvalidValue(format!(
            "`{s}` must be an http:// or https:// URL with a host"
        )));
    }
    if url.path() != "/" || url.query().is_some() {
        return Err(InvalidValue(format!(
            "`{s}` must be an origin only (e.g. http://epic-sandbox.ns.svc:8080): the sandbox serves FHIR under {}",
            super::FHIR_PATH
        )));
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

fn parse_rate(s: &str) -> Result<f64, InvalidValue> {
    let rate: f64 = s
        .parse()
        .map_err(|_| InvalidValue(format!("`{s}` is not a number")))?;
    if (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(InvalidValue(format!("`{s}` is not between 0 and 1")))
    }
}

impl SandboxArgs {
    /// The server options these arguments describe.
    pub fn options(&self) -> Result<SandboxOptions, SandboxArgsError> {
        if self.rate_429 + self.rate_5xx > 1.0 {
            return Err(SandboxArgsError::Rates);
        }
        Ok(SandboxOptions {
            bind: self.bind,
            public_origin: self.public_url.clone(),
            patients: self.patients,
            page_size: usize::try_from(self.page_size)
                .map_err(|_| SandboxArgsError::TooLarge("--page-size"))?,
            latency: Duration::from_millis(self.latency_ms),
            token_lifetime: Duration::from_secs(self.token_lifetime_secs),
            rate_429: self.rate_429,
            rate_5xx: self.rate_5xx,
            seed: self.seed,
            bulk_delay: Duration::from_millis(self.bulk_delay_ms),
            bulk_retry_after: Some(self.bulk_retry_after.trim().to_owned())
                .filter(|v| !v.is_empty()),
            bulk_file_size: usize::try_from(self.bulk_file_size)
                .map_err(|_| SandboxArgsError::TooLarge("--bulk-file-size"))?,
            bulk_throttle: Duration::from_secs(self.bulk_throttle_secs),
            bulk_expiry: Duration::from_secs(self.bulk_expiry_secs),
            bulk_files_on_storage: self.bulk_files_on_storage,
            attachments_on_storage: self.attachments_on_storage,
        })
    }

    /// The client registrations named by `--client`, with their keys loaded.
    pub fn registrations(&self) -> Result<Vec<ClientRegistration>, SandboxArgsError> {
        self.clients
            .iter()
            .map(|spec| {
                let client = |problem| SandboxArgsError::Client {
                    spec: spec.clone(),
                    problem,
                };
                let Some((client_id, source)) = spec.split_once('=') else {
                    return Err(client(
                        "write CLIENT_ID=JWKS_FILE or CLIENT_ID=https://host/jwks.json",
                    ));
                };
                if client_id.is_empty() || source.is_empty() {
                    return Err(client("both the client id and the key source are needed"));
                }
                let keys = if source.starts_with("http://") || source.starts_with("https://") {
                    url::Url::parse(source).map_err(|e| SandboxArgsError::ClientUrl {
                        client_id: client_id.to_owned(),
                        url: source.to_owned(),
                        source: e,
                    })?;
                    ClientKeys::JwksUrl(source.to_owned())
                } else {
                    ClientKeys::Jwks(read_jwks(source)?)
                };
                Ok(ClientRegistration {
                    client_id: client_id.to_owned(),
                    keys,
                })
            })
            .collect()
    }
}

fn read_jwks(path: &str) -> Result<JwkSet, SandboxArgsError> {
    let text = std::fs::read_to_string(path).map_err(|source| SandboxArgsError::JwksRead {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| SandboxArgsError::JwksParse {
        path: path.to_owned(),
        source,
    })
}

/// Starts the sandbox, prints its URLs and serves until Ctrl-C or SIGTERM.
pub async fn serve(args: SandboxArgs) -> Result<(), SandboxArgsError> {
    let registrations = args.registrations()?;
    let sandbox =
        Sandbox::start(args.options()?)
            .await
            .map_err(|source| SandboxArgsError::Start {
                bind: args.bind,
                source,
            })?;
    for reg in registrations {
        tracing::info!(client_id = %reg.client_id, "client registered");
        sandbox.register_client(reg);
    }
    if let Some(path) = &args.write_roster {
        let mut csv = String::from("patient_id\n");
        for id in sandbox.dataset().patient_ids() {
            csv.push_str(&id);
            csv.push('\n');
        }
        std::fs::write(path, csv).map_err(|source| SandboxArgsError::WriteRoster {
            path: path.display().to_string(),
            source,
        })?;
        println!("Roster: {}", path.display());
    }
    println!("FHIR base URL: {}", sandbox.base_url());
    println!("Token URL: {}", sandbox.token_url());
    println!("Bulk Data group: {}", super::SANDBOX_GROUP_ID);
    println!("Storage origin: {}", sandbox.storage_origin());
    crate::task::terminated().await;
    sandbox.shutdown().await;
    Ok(())
}
