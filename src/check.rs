//! `epic-export check`: validate the config, load the key, get a token, and explain what happened,
//! without printing the token.

use std::fmt::Write as _;
use std::time::SystemTime;

use crate::auth::token::describe_skew;
use crate::export::{ExportError, connect};
use crate::plan::ExportPlan;

/// Runs the checks and returns the report to print; `Err` carries the report of what failed.
pub async fn check(plan: &ExportPlan) -> Result<String, String> {
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
            return Err(out);
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
            Ok(out)
        }
        Err(e) => {
            let _ = writeln!(out, "token: FAILED\n{e}");
            Err(out)
        }
    }
}

fn fail_line(e: &ExportError) -> String {
    match e {
        ExportError::Key(k) => format!("key: FAILED\n{k}"),
        other => format!("FAILED: {other}"),
    }
}
