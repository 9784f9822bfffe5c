//! `epic-export check`: validate the config, load the key, check the JWK Set URL (when
//! `auth.jwksUrl` is set, see `auth::jwks_check`), reach the object store of `output.url`, get a
//! token, and explain what happened, without printing the token.

use std::fmt::Write as _;
use std::time::SystemTime;

use crate::auth::token::describe_skew;
use crate::auth::{jwks_check, scope};
use crate::export::{ExportError, connect};
use crate::plan::ExportPlan;

/// What `check` found: the report to print, and whether every check passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    pub text: String,
    pub passed: bool,
}

/// Runs the checks in order and returns the report to print (up to and including what failed).
pub async fn check(plan: &ExportPlan) -> CheckReport {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "config: ok (export {:?}, {})",
        plan.name,
        plan.describe_source()
    );
    let conn = match connect(plan).await {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(out, "{}", fail_line(&e));
            return CheckReport {
                text: out,
                passed: false,
            };
        }
    };
    let _ = writeln!(
        out,
        "key: ok ({}, kid {})",
        plan.private_key_file.display(),
        conn.kid
    );
    let _ = writeln!(
        out,
        "token URL: {} ({})",
        conn.token_url,
        if plan.token_url.is_some() {
            "configured"
        } else {
            "discovered"
        }
    );
    // The JWK Set URL is checked before the token request, and a failure there fails the check, but
    // the token request still runs so both results are shown.
    let mut failed = false;
    if let Some(url) = &plan.jwks_url {
        let outcome = jwks_check::fetch_and_compare(
            url,
            conn.tokens.key(),
            &plan.private_key_file.display().to_string(),
        )
        .await;
        out.push_str(&outcome.render());
        failed = !outcome.is_ok();
    }
    if let Some(o) = &plan.object_output {
        match crate::export::open_destination(plan).await {
            Ok(_) => {
                let _ = writeln!(
                    out,
                    "output: ok ({}: the store answers and accepts the credentials)",
                    o.location.url()
                );
            }
            Err(e) => {
                let _ = writeln!(out, "output: FAILED\n{e}");
                failed = true;
            }
        }
    }
    match conn.tokens.request().await {
        Ok((_token, grant)) => {
            let _ = writeln!(
                out,
                "token: ok (granted scope {:?}, lifetime {} s)",
                grant.scope.as_deref().unwrap_or("(not stated)"),
                grant.expires_in.as_secs()
            );
            let _ = writeln!(
                out,
                "clock:{}",
                describe_skew(grant.server_date, SystemTime::now())
            );
            if let Some(granted) = &grant.scope {
                failed |= !report_scopes(plan, granted, &mut out);
            }
            CheckReport {
                text: out,
                passed: !failed,
            }
        }
        Err(e) => {
            let _ = writeln!(out, "token: FAILED\n{e}");
            CheckReport {
                text: out,
                passed: false,
            }
        }
    }
}

/// Checks that the granted scope reads what attachments and hydration need; writes a line saying
/// what is missing and how to fix it. Returns whether nothing is.
fn report_scopes(plan: &ExportPlan, granted: &str, out: &mut String) -> bool {
    let mut needed: Vec<&str> = Vec::new();
    if plan.attachments.is_some() {
        needed.push("Binary");
    }
    needed.extend(plan.hydrate.iter().map(String::as_str));
    if needed.is_empty() {
        return true;
    }
    let missing = scope::missing_reads(granted, &needed);
    if missing.is_empty() {
        let _ = writeln!(out, "scope: ok for {}", needed.join(", "));
        return true;
    }
    let scopes: Vec<String> = missing.iter().map(|t| format!("system/{t}.read")).collect();
    let _ = writeln!(
        out,
        "scope: MISSING {}: the token does not allow reading {} (needed by {}). Add the matching \
         APIs ({}) to your Epic app, wait for the change to reach the site, and add the scopes to \
         auth.scope (or remove auth.scope to use the default)",
        scopes.join(" "),
        missing.join(", "),
        match (
            missing.contains(&"Binary"),
            missing.iter().any(|t| *t != "Binary")
        ) {
            (true, false) => "attachments.enabled",
            (true, true) => "attachments.enabled and hydrate",
            _ => "hydrate",
        },
        missing
            .iter()
            .map(|t| format!("{t}.Read (R4)"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    false
}

fn fail_line(e: &ExportError) -> String {
    match e {
        ExportError::Key(k) => format!("key: FAILED\n{k}"),
        other => format!("FAILED: {other}"),
    }
}
