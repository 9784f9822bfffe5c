//! The `sandbox` subcommand: clap arguments and [`serve`], which runs a [`Sandbox`] until
//! Ctrl-C or SIGTERM. Only argument handling lives here; the server is in `mod.rs`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use jsonwebtoken::jwk::JwkSet;

use super::{ClientKeys, ClientRegistration, Sandbox, SandboxOptions};

/// Run the built-in Epic-compatible FHIR sandbox.
#[derive(clap::Args, Debug, Clone)]
pub struct SandboxArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub bind: SocketAddr,
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
    /// A client id to register; repeat it, each paired in order with one --jwks or --jwks-url.
    #[arg(long = "client-id")]
    pub client_ids: Vec<String>,
    /// A JWK Set JSON file with the public keys of the matching --client-id.
    #[arg(long = "jwks")]
    pub jwks: Vec<PathBuf>,
    /// A JWK Set URL for the matching --client-id.
    #[arg(long = "jwks-url")]
    pub jwks_urls: Vec<String>,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let rate: f64 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    if (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(format!("`{s}` is not between 0 and 1"))
    }
}

impl SandboxArgs {
    /// The server options these arguments describe.
    pub fn options(&self) -> anyhow::Result<SandboxOptions> {
        if self.rate_429 + self.rate_5xx > 1.0 {
            bail!("--rate-429 plus --rate-5xx must not exceed 1");
        }
        Ok(SandboxOptions {
            bind: self.bind,
            patients: self.patients,
            page_size: usize::try_from(self.page_size).context("--page-size is too large")?,
            latency: Duration::from_millis(self.latency_ms),
            token_lifetime: Duration::from_secs(self.token_lifetime_secs),
            rate_429: self.rate_429,
            rate_5xx: self.rate_5xx,
            seed: self.seed,
        })
    }

    /// Pairs each `--client-id` with its key source, in command-line order.
    ///
    /// clap keeps `--jwks` and `--jwks-url` in separate lists, so the pairing uses the raw
    /// argument order from `argv` (`--client-id A --jwks-url U --client-id B --jwks F`).
    pub fn registrations_from(&self, argv: &[String]) -> anyhow::Result<Vec<ClientRegistration>> {
        let mut sources: Vec<KeySource> = Vec::new();
        let mut args = argv.iter();
        while let Some(arg) = args.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) => (f, Some(v.to_string())),
                None => (arg.as_str(), None),
            };
            let kind = match flag {
                "--jwks" => KeySource::File,
                "--jwks-url" => KeySource::Url,
                _ => continue,
            };
            let value = match inline {
                Some(v) => v,
                None => args.next().cloned().unwrap_or_default(),
            };
            sources.push(kind(value));
        }
        if sources.len() != self.jwks.len() + self.jwks_urls.len() {
            // argv does not describe these arguments (e.g. built programmatically):
            // pair files first, then URLs.
            sources.clear();
            sources.extend(
                self.jwks
                    .iter()
                    .map(|p| KeySource::File(p.display().to_string())),
            );
            sources.extend(self.jwks_urls.iter().cloned().map(KeySource::Url));
        }
        if sources.len() != self.client_ids.len() {
            bail!(
                "--client-id was given {} time(s) but --jwks/--jwks-url {} time(s); give one key source per client id, in the same order",
                self.client_ids.len(),
                sources.len()
            );
        }
        self.client_ids
            .iter()
            .zip(sources)
            .map(|(client_id, source)| {
                let keys = match source {
                    KeySource::File(path) => ClientKeys::Jwks(read_jwks(&path)?),
                    KeySource::Url(url) => {
                        url::Url::parse(&url)
                            .with_context(|| format!("--jwks-url `{url}` is not a valid URL"))?;
                        ClientKeys::JwksUrl(url)
                    }
                };
                Ok(ClientRegistration {
                    client_id: client_id.clone(),
                    keys,
                })
            })
            .collect()
    }
}

enum KeySource {
    File(String),
    Url(String),
}

fn read_jwks(path: &str) -> anyhow::Result<JwkSet> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--jwks {path}: cannot read the file"))?;
    serde_json::from_str(&text)
        .with_context(|| format!("--jwks {path}: not a JWK Set (JSON with a `keys` array)"))
}

/// Starts the sandbox, prints its URLs and serves until Ctrl-C or SIGTERM.
pub async fn serve(args: SandboxArgs) -> anyhow::Result<()> {
    let argv: Vec<String> = std::env::args().collect();
    let registrations = args.registrations_from(&argv)?;
    let sandbox = Sandbox::start(args.options()?)
        .await
        .with_context(|| format!("--bind {}: cannot start the sandbox", args.bind))?;
    for reg in registrations {
        tracing::info!(client_id = %reg.client_id, "client registered");
        sandbox.register_client(reg);
    }
    println!("FHIR base URL: {}", sandbox.base_url());
    println!("Token URL: {}", sandbox.token_url());
    shutdown_signal().await;
    tracing::info!("shutting down the sandbox");
    sandbox.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
