//! E-mail notifications about standalone runs (`notify.email`).
//!
//! After `epic-export run` ends, the run's `RunSummary` is rendered into a short message (`message`,
//! pure: counts, sizes, duration, shortened errors, the output folder; never patient ids or resource
//! content) and sent over SMTP (`smtp`, lettre with rustls/aws-lc-rs). Sending is best-effort: a
//! notification failure never changes the export's result or exit code; it is logged and recorded in
//! the run's `summary.json` under `notification.email`.

pub mod message;
pub mod smtp;
pub mod stream;
pub mod tls;

use std::path::PathBuf;
use std::time::Duration;

use lettre::message::Mailbox;

use crate::summary::{Outcome, RunSummary};

/// How the SMTP connection is secured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain text (port 25 by default). Only sensible on loopback.
    None,
    /// STARTTLS required (port 587 by default).
    Starttls,
    /// TLS from the first byte, "SMTPS" (port 465 by default).
    Tls,
}

/// A `notify.email` value that is not one of the choices.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChoiceError {
    #[error("{0:?} is not a TLS mode: use none, starttls or tls")]
    TlsMode(String),
    #[error("{0:?} is not an outcome: use success, partial or failure")]
    Outcome(String),
}

impl TlsMode {
    pub fn parse(s: &str) -> Result<Self, ChoiceError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" => Ok(TlsMode::None),
            "starttls" => Ok(TlsMode::Starttls),
            "tls" => Ok(TlsMode::Tls),
            _ => Err(ChoiceError::TlsMode(s.to_owned())),
        }
    }

    pub fn default_port(self) -> u16 {
        match self {
            TlsMode::None => 25,
            TlsMode::Starttls => 587,
            TlsMode::Tls => 465,
        }
    }
}

/// Where the SMTP password comes from (never the config file itself).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PasswordSource {
    /// An environment variable, read at send time.
    Env(String),
    /// A file (trailing newline trimmed), read at send time.
    File(PathBuf),
    /// Given directly (the operator reads it from a Secret); never shown by `Debug`.
    Value(SecretValue),
}

/// A password held in memory; `Debug` prints `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(pub String);

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// Where the trusted SMTP certificate (`caFile`) comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaCert {
    /// A PEM file, read at send time (standalone `notify.email.caFile`).
    File(PathBuf),
    /// PEM text (the operator reads it from a ConfigMap or Secret).
    Pem(Vec<u8>),
}

/// Which outcomes are reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OnSet {
    pub success: bool,
    pub partial: bool,
    pub failure: bool,
}

impl Default for OnSet {
    fn default() -> Self {
        OnSet {
            success: true,
            partial: true,
            failure: true,
        }
    }
}

impl OnSet {
    /// Parses `on:`; an empty list means every outcome.
    pub fn parse(values: &[String]) -> Result<Self, ChoiceError> {
        if values.is_empty() {
            return Ok(OnSet::default());
        }
        let mut on = OnSet {
            success: false,
            partial: false,
            failure: false,
        };
        for v in values {
            match v.trim().to_ascii_lowercase().as_str() {
                "success" => on.success = true,
                "partial" => on.partial = true,
                "failure" | "failed" => on.failure = true,
                _ => return Err(ChoiceError::Outcome(v.clone())),
            }
        }
        Ok(on)
    }

    pub fn includes(&self, outcome: Outcome) -> bool {
        match outcome {
            Outcome::Success => self.success,
            Outcome::Partial => self.partial,
            Outcome::Failed => self.failure,
        }
    }
}

/// The validated `notify.email` block.
#[derive(Clone, Debug)]
pub struct EmailPlan {
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    pub from: Mailbox,
    pub to: Vec<Mailbox>,
    pub username: Option<String>,
    pub password: Option<PasswordSource>,
    /// A PEM certificate to trust: a CA (added to the platform roots), or the server's own
    /// certificate, which is then accepted as pinned whatever its CA flag and names.
    pub ca: Option<CaCert>,
    /// Accept any certificate (only allowed for loopback hosts).
    pub insecure_skip_verify: bool,
    pub on: OnSet,
    pub timeout: Duration,
}

/// What is wrong with the SMTP server settings; [`ServerProblem::key`] names the key under
/// `notify.email`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServerProblem {
    #[error("{0:?} is not a host name or address: write e.g. smtp.example.org or 127.0.0.1")]
    Host(String),
    #[error(
        "is none, so the SMTP password would cross the network in plain text to {0}: use starttls or tls (none is only for a loopback host)"
    )]
    PlainTextPassword(String),
    #[error(
        "0 is not a port: use 1 to 65535, or leave it out (587 for starttls, 465 for tls, 25 for none)"
    )]
    Port,
}

impl ServerProblem {
    /// The key under `notify.email` the problem is in.
    pub fn key(&self) -> &'static str {
        match self {
            ServerProblem::Host(_) => "host",
            ServerProblem::PlainTextPassword(_) => "tls",
            ServerProblem::Port => "port",
        }
    }
}

/// The rules for the SMTP server of `notify.email`, whichever front end it came from (the config
/// file or an `EpicExport`): a host name or address, a port (by default the one of `tls`), and no
/// credentials over plain text to a host that is not loopback. Returns the port.
pub fn check_server(
    host: &str,
    tls: TlsMode,
    port: Option<u16>,
    credentials: bool,
) -> Result<u16, ServerProblem> {
    if host.is_empty() || host.contains(char::is_whitespace) || host.contains('/') {
        return Err(ServerProblem::Host(host.to_owned()));
    }
    if tls == TlsMode::None && credentials && !crate::trust::is_loopback_host(host) {
        return Err(ServerProblem::PlainTextPassword(host.to_owned()));
    }
    match port {
        Some(0) => Err(ServerProblem::Port),
        Some(p) => Ok(p),
        None => Ok(tls.default_port()),
    }
}

/// What became of a notification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotifyResult {
    /// No `notify.email`, or the outcome is not in `on`.
    Skipped,
    Sent {
        recipients: usize,
    },
    Failed(String),
}

impl NotifyResult {
    /// The text recorded in `summary.json` (`notification.email`), if anything was attempted.
    pub fn record(&self) -> Option<String> {
        match self {
            NotifyResult::Skipped => None,
            NotifyResult::Sent { recipients } => Some(format!(
                "sent to {recipients} recipient{}",
                if *recipients == 1 { "" } else { "s" }
            )),
            NotifyResult::Failed(reason) => Some(format!("failed: {reason}")),
        }
    }
}

/// Sends the notification for a finished run if `notify.email` is set and the outcome is in `on`.
/// Never fails: problems come back as `NotifyResult::Failed` (and are logged as warnings).
pub async fn notify_run(plan: Option<&EmailPlan>, summary: &RunSummary) -> NotifyResult {
    notify_run_with(plan, summary, &smtp::SendOptions::default()).await
}

/// `notify_run` with explicit retry settings.
pub async fn notify_run_with(
    plan: Option<&EmailPlan>,
    summary: &RunSummary,
    options: &smtp::SendOptions,
) -> NotifyResult {
    let Some(plan) = plan else {
        return NotifyResult::Skipped;
    };
    if !plan.on.includes(summary.outcome) {
        tracing::debug!(
            "no e-mail: outcome {:?} is not in notify.email.on",
            summary.outcome
        );
        return NotifyResult::Skipped;
    }
    let rendered = message::render(summary);
    match smtp::send(plan, &rendered, options).await {
        Ok(n) => {
            tracing::info!(
                "notification e-mail sent to {n} recipient(s) via {}:{}",
                plan.host,
                plan.port
            );
            NotifyResult::Sent { recipients: n }
        }
        Err(e) => {
            let reason = e.to_string();
            tracing::warn!(
                "notification e-mail not sent (the export's result is unchanged): {reason}"
            );
            NotifyResult::Failed(reason)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_set_and_modes() {
        assert_eq!(OnSet::parse(&[]).unwrap(), OnSet::default());
        let on = OnSet::parse(&["failure".into()]).unwrap();
        assert!(on.includes(Outcome::Failed) && !on.includes(Outcome::Success));
        assert!(OnSet::parse(&["sometimes".into()]).is_err());
        assert_eq!(TlsMode::parse("STARTTLS").unwrap().default_port(), 587);
        assert_eq!(TlsMode::parse("tls").unwrap().default_port(), 465);
        assert_eq!(TlsMode::parse("none").unwrap().default_port(), 25);
        assert!(TlsMode::parse("ssl").is_err());
        assert_eq!(
            NotifyResult::Sent { recipients: 2 }.record().unwrap(),
            "sent to 2 recipients"
        );
        assert_eq!(NotifyResult::Skipped.record(), None);
    }
}
