//! Sending over SMTP with lettre (`AsyncSmtpTransport<Tokio1Executor>`, rustls with aws-lc-rs).
//!
//! `tls: none | starttls | tls`; `caFile` adds a PEM CA to the platform trust roots (e.g. the
//! self-signed certificate of a local bridge such as ProtonMail Bridge); `insecureSkipVerify` (only
//! accepted for loopback hosts) accepts any certificate. AUTH PLAIN/LOGIN when a username is set, the
//! password read at send time from an environment variable or a file. Transient failures (cannot
//! connect, timeouts, 4xx replies) are retried; authentication and other 5xx failures are not.

use std::time::Duration;

use lettre::message::{Mailbox, Mailboxes, MultiPart, header};
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::message::Rendered;
use super::{EmailPlan, PasswordSource, TlsMode};

/// Retry settings.
#[derive(Clone, Debug)]
pub struct SendOptions {
    pub attempts: u32,
    /// Wait before the second attempt; doubled for each further one.
    pub backoff: Duration,
}

impl Default for SendOptions {
    fn default() -> Self {
        SendOptions {
            attempts: 3,
            backoff: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("SMTP password: environment variable {0} (notify.email.passwordEnv) is not set")]
    PasswordEnvMissing(String),
    #[error("SMTP password: cannot read {path} (notify.email.passwordFile): {source}")]
    PasswordFile {
        path: String,
        source: std::io::Error,
    },
    #[error("notify.email.caFile {path}: {message}")]
    CaFile { path: String, message: String },
    #[error("cannot build the message: {0}")]
    Message(String),
    #[error("TLS setup: {0}")]
    TlsSetup(String),
    #[error(
        "authentication failed at {server} (check notify.email.username and the password): {detail}"
    )]
    Auth { server: String, detail: String },
    #[error("cannot connect to {server}: {detail}")]
    Connect { server: String, detail: String },
    #[error(
        "TLS handshake with {server} failed (for a self-signed certificate set notify.email.caFile): {detail}"
    )]
    Tls { server: String, detail: String },
    #[error("timed out talking to {server}: {detail}")]
    Timeout { server: String, detail: String },
    #[error("{server} refused the message: {detail}")]
    Rejected { server: String, detail: String },
    #[error("SMTP error with {server}: {detail}")]
    Other { server: String, detail: String },
}

impl SendError {
    /// Whether another attempt may succeed.
    fn is_transient(&self) -> bool {
        matches!(
            self,
            SendError::Connect { .. } | SendError::Timeout { .. } | SendError::Other { .. }
        ) || matches!(self, SendError::Rejected { detail, .. } if detail.starts_with("transient"))
    }
}

fn password(plan: &EmailPlan) -> Result<Option<String>, SendError> {
    match &plan.password {
        None => Ok(None),
        Some(PasswordSource::Env(var)) => match std::env::var(var) {
            Ok(p) => Ok(Some(p)),
            Err(_) => Err(SendError::PasswordEnvMissing(var.clone())),
        },
        Some(PasswordSource::Value(v)) => Ok(Some(v.0.clone())),
        Some(PasswordSource::File(path)) => match std::fs::read_to_string(path) {
            Ok(p) => Ok(Some(p.trim_end_matches(['\n', '\r']).to_owned())),
            Err(source) => Err(SendError::PasswordFile {
                path: path.display().to_string(),
                source,
            }),
        },
    }
}

fn tls_parameters(plan: &EmailPlan) -> Result<TlsParameters, SendError> {
    let mut b = TlsParameters::builder(plan.host.clone());
    if let Some(ca) = &plan.ca {
        let (path, pem) = match ca {
            super::CaCert::File(path) => (
                path.display().to_string(),
                std::fs::read(path).map_err(|e| SendError::CaFile {
                    path: path.display().to_string(),
                    message: format!("cannot read it: {e}"),
                })?,
            ),
            super::CaCert::Pem(pem) => ("(from the cluster)".to_owned(), pem.clone()),
        };
        let cert = Certificate::from_pem(&pem).map_err(|e| SendError::CaFile {
            path,
            message: format!("not a PEM certificate: {e}"),
        })?;
        b = b.add_root_certificate(cert);
    }
    if plan.insecure_skip_verify {
        b = b
            .dangerous_accept_invalid_certs(true)
            .dangerous_accept_invalid_hostnames(true);
    }
    b.build_rustls()
        .map_err(|e| SendError::TlsSetup(e.to_string()))
}

/// Builds the multipart/alternative message.
pub fn build_message(
    from: &Mailbox,
    to: &[Mailbox],
    rendered: &Rendered,
) -> Result<Message, SendError> {
    let mut b = Message::builder()
        .from(from.clone())
        .subject(rendered.subject.clone())
        .header(header::UserAgent::from(format!(
            "epic-export {}",
            env!("CARGO_PKG_VERSION")
        )));
    let mut boxes = Mailboxes::new();
    for m in to {
        boxes.push(m.clone());
    }
    b = b.mailbox(header::To::from(boxes));
    b.multipart(MultiPart::alternative_plain_html(
        rendered.text.clone(),
        rendered.html.clone(),
    ))
    .map_err(|e| SendError::Message(e.to_string()))
}

fn classify(server: &str, e: lettre::transport::smtp::Error) -> SendError {
    let server = server.to_owned();
    let detail = e.to_string();
    if let Some(code) = e.status() {
        let code = code.to_string();
        if e.is_permanent() && matches!(code.as_str(), "535" | "534" | "530" | "538") {
            return SendError::Auth { server, detail };
        }
        return SendError::Rejected { server, detail };
    }
    if e.is_timeout() {
        return SendError::Timeout { server, detail };
    }
    if e.is_tls() {
        return SendError::Tls { server, detail };
    }
    if detail.starts_with("Connection error") || detail.starts_with("network error") {
        return SendError::Connect { server, detail };
    }
    if detail.contains("authentication") {
        return SendError::Auth { server, detail };
    }
    SendError::Other { server, detail }
}

/// Sends the rendered message to every recipient; returns how many.
pub async fn send(
    plan: &EmailPlan,
    rendered: &Rendered,
    options: &SendOptions,
) -> Result<usize, SendError> {
    let password = password(plan)?;
    let message = build_message(&plan.from, &plan.to, rendered)?;
    let tls = match plan.tls {
        TlsMode::None => Tls::None,
        TlsMode::Starttls => Tls::Required(tls_parameters(plan)?),
        TlsMode::Tls => Tls::Wrapper(tls_parameters(plan)?),
    };
    if plan.insecure_skip_verify && plan.tls != TlsMode::None {
        tracing::warn!(
            "notify.email.insecureSkipVerify: not verifying the certificate of {} (loopback only)",
            plan.host
        );
    }
    let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(plan.host.as_str())
        .port(plan.port)
        .tls(tls)
        .timeout(Some(plan.timeout));
    if let Some(user) = &plan.username {
        builder = builder
            .credentials(Credentials::new(
                user.clone(),
                password.clone().unwrap_or_default(),
            ))
            .authentication(vec![Mechanism::Plain, Mechanism::Login]);
    }
    let transport = builder.build();
    let server = format!("{}:{}", plan.host, plan.port);
    let attempts = options.attempts.max(1);
    let mut wait = options.backoff;
    let mut attempt = 1;
    loop {
        match transport.send(message.clone()).await {
            Ok(_) => return Ok(plan.to.len()),
            Err(e) => {
                let err = classify(&server, e);
                if attempt >= attempts || !err.is_transient() {
                    return Err(err);
                }
                tracing::warn!(
                    "notification e-mail attempt {attempt} of {attempts} failed, retrying in {:?}: {err}",
                    wait
                );
                tokio::time::sleep(wait).await;
                wait *= 2;
                attempt += 1;
            }
        }
    }
}
