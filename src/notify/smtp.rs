//! Sending over SMTP: the connection and its TLS are ours (`stream`, with the certificate rules of
//! `tls`), the SMTP session after it is lettre's (`AsyncSmtpConnection`: EHLO, AUTH, MAIL, DATA).
//!
//! `tls: none | starttls | tls`; `caFile` is trusted as a CA and, when the server presents one of its
//! certificates itself, as a pinned certificate (ProtonMail Bridge's own); `insecureSkipVerify` (only
//! accepted for loopback hosts) accepts any certificate. AUTH PLAIN/LOGIN when a username is set, the
//! password read at send time from an environment variable or a file, and never over a connection
//! without TLS to a host that is not loopback. Transient failures (cannot connect, timeouts, 4xx
//! replies) are retried; authentication and other 5xx failures are not. `timeoutSeconds` bounds each
//! attempt.

use std::time::Duration;

use lettre::Message;
use lettre::message::{Mailbox, Mailboxes, MultiPart, header};
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::AsyncSmtpConnection;
use lettre::transport::smtp::extension::ClientId;

use super::message::Rendered;
use super::stream::{self, ConnectError};
use super::tls;
use super::{EmailPlan, PasswordSource, TlsMode};
use crate::http::retry::Backoff;

/// Retry settings.
#[derive(Clone, Debug)]
pub struct SendOptions {
    pub attempts: u32,
    /// Wait before the second attempt (with jitter); doubled for each further one, up to a minute.
    pub backoff: Duration,
}

/// The longest wait between two attempts.
const MAX_WAIT: Duration = Duration::from_secs(60);

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
    TlsSetup(rustls::Error),
    #[error("not sending to {server}: {message}")]
    Refused { server: String, message: String },
    #[error(
        "authentication failed at {server} (check notify.email.username and the password): {detail}"
    )]
    Auth { server: String, detail: String },
    #[error("cannot connect to {server}: {detail}")]
    Connect { server: String, detail: String },
    #[error(
        "TLS handshake with {server} failed (for a self-signed certificate, such as a local bridge's, put it in notify.email.caFile): {detail}"
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

/// The TLS client configuration for the plan: `caFile`'s certificates as roots and pins.
fn tls_config(plan: &EmailPlan) -> Result<std::sync::Arc<rustls::ClientConfig>, SendError> {
    let ca = match &plan.ca {
        None => Vec::new(),
        Some(ca) => {
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
            tls::parse_pem_certificates(&pem).map_err(|problem| SendError::CaFile {
                path,
                message: problem.to_string(),
            })?
        }
    };
    tls::SmtpVerifier::new(ca, plan.insecure_skip_verify)
        .client_config()
        .map_err(SendError::TlsSetup)
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
    let server = format!("{}:{}", plan.host, plan.port);
    // The front ends refuse such a plan already; this guards every way a plan can be made.
    super::check_server(
        &plan.host,
        plan.tls,
        Some(plan.port),
        plan.username.is_some(),
    )
    .map_err(|p| SendError::Refused {
        server: server.clone(),
        message: format!("notify.email.{} {p}", p.key()),
    })?;
    let tls = match plan.tls {
        TlsMode::None => None,
        TlsMode::Starttls | TlsMode::Tls => Some(tls_config(plan)?),
    };
    if plan.insecure_skip_verify && plan.tls != TlsMode::None {
        tracing::warn!(
            "notify.email.insecureSkipVerify: not verifying the certificate of {} (loopback only)",
            plan.host
        );
    }
    let credentials = plan
        .username
        .as_ref()
        .map(|user| Credentials::new(user.clone(), password.clone().unwrap_or_default()));
    let attempts = options.attempts.max(1);
    let backoff = Backoff {
        first: options.backoff,
        cap: MAX_WAIT.max(options.backoff),
    };
    let mut attempt = 1;
    loop {
        let once = attempt_send(plan, tls.clone(), credentials.as_ref(), &message, &server);
        let result = match tokio::time::timeout(plan.timeout, once).await {
            Ok(r) => r,
            Err(_) => Err(SendError::Timeout {
                server: server.clone(),
                detail: format!("no answer within {} s", plan.timeout.as_secs()),
            }),
        };
        match result {
            Ok(()) => return Ok(plan.to.len()),
            Err(err) => {
                if attempt >= attempts || !err.is_transient() {
                    return Err(err);
                }
                let wait = backoff.next(attempt);
                tracing::warn!(
                    "notification e-mail attempt {attempt} of {attempts} failed, retrying in {:?}: {err}",
                    wait
                );
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
        }
    }
}

/// One attempt: connect (and secure), log in, send, quit.
async fn attempt_send(
    plan: &EmailPlan,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    credentials: Option<&Credentials>,
    message: &Message,
    server: &str,
) -> Result<(), SendError> {
    let hello = ClientId::default();
    let connected = stream::connect(&plan.host, plan.port, plan.tls, tls, &hello)
        .await
        .map_err(|e| match e {
            ConnectError::Connect(detail) => SendError::Connect {
                server: server.to_owned(),
                detail,
            },
            ConnectError::Tls(detail) => SendError::Tls {
                server: server.to_owned(),
                detail,
            },
            ConnectError::Protocol(detail) => SendError::Other {
                server: server.to_owned(),
                detail,
            },
        })?;
    let mut conn = AsyncSmtpConnection::connect_with_transport(Box::new(connected), &hello)
        .await
        .map_err(|e| classify(server, e))?;
    if let Some(c) = credentials {
        conn.auth(&[Mechanism::Plain, Mechanism::Login], c)
            .await
            .map_err(|e| classify(server, e))?;
    }
    conn.send(message.envelope(), &message.formatted())
        .await
        .map_err(|e| classify(server, e))?;
    let _ = conn.quit().await;
    Ok(())
}
