//! The notification message (pure): subject, a plain-text part and an HTML part with the same
//! content, all from a `RunSummary`. The summary holds counts, sizes, error messages and the output
//! folder, never patient ids or resource content, and nothing else is put in the message.

use std::fmt::Write as _;

use crate::summary::{Outcome, RunSummary};

/// Errors listed in a message; the rest are counted.
pub const MAX_ERRORS: usize = 5;
/// Longest error text in a message (bytes); longer ones are cut with "…".
pub const MAX_ERROR_BYTES: usize = 300;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    pub subject: String,
    pub text: String,
    pub html: String,
}

fn outcome_word(o: Outcome) -> &'static str {
    match o {
        Outcome::Success => "success",
        Outcome::Partial => "partial",
        Outcome::Failed => "failed",
    }
}

/// `s` on one line (control characters become spaces), at most `max` bytes.
fn one_line(s: &str, max: usize) -> String {
    let line: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    crate::text::shorten(&line, max).into_owned()
}

fn duration_text(seconds: f64) -> String {
    let total = seconds.max(0.0).round() as u64;
    let (h, m, s) = (total / 3600, total / 60 % 60, total % 60);
    if h > 0 {
        format!("{h} h {m} min {s} s")
    } else if m > 0 {
        format!("{m} min {s} s")
    } else {
        format!("{seconds:.1} s")
    }
}

/// The subject: `[epic-export] <name>: <outcome> — <N> records`.
pub fn subject(s: &RunSummary) -> String {
    // Header-safe: no control characters (the export name is validated anyway).
    one_line(
        &format!(
            "[epic-export] {}: {} — {} records",
            s.export,
            outcome_word(s.outcome),
            s.records_total
        ),
        200,
    )
}

/// Failed requests named in a message.
const MAX_FAILED_REQUESTS: usize = 10;

/// The failed requests of the summary, one line each with the server's correlation ids, e.g.
/// `GET /api/FHIR/R4/Observation?patient={id} → HTTP 503 (x-request-id: 4f2c…)`.
fn failed_request_lines(s: &RunSummary) -> Vec<String> {
    s.failed_requests
        .iter()
        .take(MAX_FAILED_REQUESTS)
        .map(|f| {
            let what = match (&f.error, f.status) {
                (Some(e), _) => e.clone(),
                (None, Some(st)) => format!("HTTP {st}"),
                (None, None) => "failed".into(),
            };
            let ids: Vec<String> = f
                .correlation
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            let ids = match ids.is_empty() {
                true => "no correlation id".to_owned(),
                false => ids.join(", "),
            };
            one_line(
                &format!("{} {} → {what} ({ids})", f.method, f.path),
                MAX_ERROR_BYTES,
            )
        })
        .collect()
}

/// Renders the whole message.
pub fn render(s: &RunSummary) -> Rendered {
    let failed_requests = failed_request_lines(s);
    let errors: Vec<String> = s
        .errors
        .iter()
        .take(MAX_ERRORS)
        .map(|e| one_line(e, MAX_ERROR_BYTES))
        .collect();
    let more_errors = s.errors.len().saturating_sub(MAX_ERRORS);
    let mut facts: Vec<(&str, String)> = vec![
        ("Export", s.export.clone()),
        ("Outcome", outcome_word(s.outcome).to_string()),
        ("Run", s.run_id.clone()),
        ("Started", s.started_at.clone()),
        ("Finished", s.finished_at.clone()),
        ("Duration", duration_text(s.duration_seconds)),
        ("Mode", s.mode.to_string()),
        ("FHIR server", s.fhir_base_url.clone()),
        (
            "Requests",
            format!("{} ({} retries)", s.requests, s.retries),
        ),
        ("Records", s.records_total.to_string()),
        ("Bytes", s.bytes_total.to_string()),
        (
            // A run published to an object store is named by its URL.
            if s.output_dir.contains("://") {
                "Output"
            } else {
                "Output folder"
            },
            s.output_dir.clone(),
        ),
    ];
    if let Some(a) = &s.attachments {
        facts.push((
            "Attachments",
            format!(
                "{} files, {} bytes ({} inlined, {} skipped by content type, {} failed)",
                a.files, a.bytes, a.inlined, a.skipped, a.failed
            ),
        ));
    }
    if let Some(h) = &s.hydration {
        let fetched: Vec<String> = h.fetched.iter().map(|(t, n)| format!("{t} {n}")).collect();
        facts.push((
            "Hydrated",
            format!(
                "{} ({} failed)",
                if fetched.is_empty() {
                    "none".to_string()
                } else {
                    fetched.join(", ")
                },
                h.failed
            ),
        ));
    }

    // Plain text.
    let mut text = String::new();
    let _ = writeln!(text, "{}\n", subject(s));
    let kw = facts.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in &facts {
        let _ = writeln!(text, "{k:<kw$}  {v}");
    }
    let tw = s
        .resources
        .iter()
        .map(|r| r.resource_type.len())
        .max()
        .unwrap_or(0)
        .max(5);
    let _ = writeln!(
        text,
        "\n{:<tw$}  {:>10}  {:>14}",
        "Type", "Records", "Bytes"
    );
    for r in &s.resources {
        let _ = writeln!(
            text,
            "{:<tw$}  {:>10}  {:>14}",
            r.resource_type, r.records, r.bytes
        );
    }
    let _ = writeln!(
        text,
        "{:<tw$}  {:>10}  {:>14}",
        "Total", s.records_total, s.bytes_total
    );
    if s.server_outcomes > 0 {
        let _ = writeln!(
            text,
            "\n{} OperationOutcome entries from the server (errors/OperationOutcome.ndjson)",
            s.server_outcomes
        );
    }
    if !errors.is_empty() {
        let _ = writeln!(text, "\nErrors ({}):", s.errors.len());
        for e in &errors {
            let _ = writeln!(text, "- {e}");
        }
        if more_errors > 0 {
            let _ = writeln!(text, "… and {more_errors} more (see summary.json)");
        }
    }
    if !failed_requests.is_empty() {
        let _ = writeln!(
            text,
            "\nFailed requests, with the server's correlation ids (cite them to the server's support; all in log.ndjson):"
        );
        for f in &failed_requests {
            let _ = writeln!(text, "- {f}");
        }
    }
    let _ = writeln!(text, "\nDetails: summary.json in the output folder.");

    // HTML, the same content, everything escaped.
    let e = crate::text::escape_html;
    let mut html = String::new();
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{}</title></head><body>\n<h2>{}</h2>\n<table>\n",
        e(&subject(s)),
        e(&subject(s))
    );
    for (k, v) in &facts {
        let _ = writeln!(
            html,
            "<tr><th align=\"left\">{}</th><td>{}</td></tr>",
            e(k),
            e(v)
        );
    }
    let _ = write!(
        html,
        "</table>\n<h3>Resources</h3>\n<table border=\"1\" cellpadding=\"4\" cellspacing=\"0\">\n<tr><th>Type</th><th>Records</th><th>Bytes</th></tr>\n"
    );
    for r in &s.resources {
        let _ = writeln!(
            html,
            "<tr><td>{}</td><td align=\"right\">{}</td><td align=\"right\">{}</td></tr>",
            e(&r.resource_type),
            r.records,
            r.bytes
        );
    }
    let _ = writeln!(
        html,
        "<tr><th align=\"left\">Total</th><th align=\"right\">{}</th><th align=\"right\">{}</th></tr>\n</table>",
        s.records_total, s.bytes_total
    );
    if s.server_outcomes > 0 {
        let _ = writeln!(
            html,
            "<p>{} OperationOutcome entries from the server (errors/OperationOutcome.ndjson)</p>",
            s.server_outcomes
        );
    }
    if !errors.is_empty() {
        let _ = writeln!(html, "<h3>Errors ({})</h3>\n<ul>", s.errors.len());
        for m in &errors {
            let _ = writeln!(html, "<li>{}</li>", e(m));
        }
        let _ = writeln!(html, "</ul>");
        if more_errors > 0 {
            let _ = writeln!(html, "<p>… and {more_errors} more (see summary.json)</p>");
        }
    }
    if !failed_requests.is_empty() {
        let _ = writeln!(
            html,
            "<h3>Failed requests, with the server's correlation ids</h3>\n<p>Cite them to the server's support; all requests are in log.ndjson.</p>\n<ul>"
        );
        for f in &failed_requests {
            let _ = writeln!(html, "<li>{}</li>", e(f));
        }
        let _ = writeln!(html, "</ul>");
    }
    let _ = writeln!(
        html,
        "<p>Details: summary.json in the output folder.</p>\n</body></html>"
    );

    Rendered {
        subject: subject(s),
        text,
        html,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::summary::{RunMode, TypeCount};

    fn summary() -> RunSummary {
        RunSummary {
            export: "nightly".into(),
            run_id: "20261128T020000Z".into(),
            outcome: Outcome::Partial,
            started_at: "2026-11-28T02:00:00Z".into(),
            finished_at: "2026-11-28T02:01:05Z".into(),
            duration_seconds: 65.2,
            fhir_base_url: "https://fhir.example.org/R4".into(),
            mode: RunMode::Search,
            requests: 40,
            retries: 2,
            token_renewals_after_401: 0,
            resources: vec![
                TypeCount {
                    resource_type: "Patient".into(),
                    records: 3,
                    bytes: 1200,
                    file: "Patient.ndjson".into(),
                },
                TypeCount {
                    resource_type: "Observation<script>".into(),
                    records: 30,
                    bytes: 45000,
                    file: "Observation.ndjson".into(),
                },
            ],
            records_total: 33,
            bytes_total: 46200,
            server_outcomes: 1,
            search: None,
            bulk: None,
            attachments: Some(crate::summary::AttachmentStats {
                files: 4,
                bytes: 9000,
                failed: 1,
                ..Default::default()
            }),
            hydration: None,
            errors: (0..8)
                .map(|i| {
                    format!(
                        "search {i} failed: <b>\"bad\" & 'worse'</b> {}",
                        "x".repeat(400)
                    )
                })
                .collect(),
            failed_requests: Vec::new(),
            output_dir: "/data/out/nightly/20261128T020000Z".into(),
            notification: None,
        }
    }

    #[test]
    fn subject_and_parts() {
        let r = render(&summary());
        assert_eq!(r.subject, "[epic-export] nightly: partial — 33 records");
        for part in [&r.text, &r.html] {
            assert!(part.contains("Patient"));
            assert!(part.contains("45000"));
            assert!(part.contains("/data/out/nightly/20261128T020000Z"));
            assert!(part.contains("1 min 5 s"));
            assert!(part.contains("and 3 more"));
            assert!(part.contains('…'), "long errors are shortened");
            assert!(!part.contains(&"x".repeat(MAX_ERROR_BYTES)));
        }
        assert!(r.text.contains("search 4 failed"));
        assert!(r.text.contains("Attachments"));
        assert!(r.text.contains("4 files, 9000 bytes"));
        assert!(!r.text.contains("search 5 failed"));
    }

    #[test]
    fn html_is_escaped() {
        let r = render(&summary());
        assert!(!r.html.contains("<script>"));
        assert!(!r.html.contains("<b>"));
        assert!(r.html.contains("Observation&lt;script&gt;"));
        assert!(
            r.html
                .contains("&lt;b&gt;&quot;bad&quot; &amp; &#39;worse&#39;&lt;/b&gt;")
        );
        assert_eq!(
            crate::text::escape_html("a<b>&\"'"),
            "a&lt;b&gt;&amp;&quot;&#39;"
        );
    }

    #[test]
    fn nothing_but_the_summary() {
        // The message is built from the summary only; a summary without ids gives a message without
        // ids. Check that no field outside the summary leaks in: every line of the text part is a
        // heading, a fact, a count row or an error from the summary.
        let mut s = summary();
        s.errors.clear();
        s.resources.truncate(1);
        let r = render(&s);
        for line in r.text.lines().filter(|l| !l.trim().is_empty()) {
            let known = line.starts_with("[epic-export]")
                || line.starts_with("Type")
                || line.starts_with("Patient")
                || line.starts_with("Total")
                || line.starts_with("Details:")
                || line.contains("OperationOutcome")
                || [
                    "Export",
                    "Outcome",
                    "Run",
                    "Started",
                    "Finished",
                    "Duration",
                    "Mode",
                    "FHIR server",
                    "Requests",
                    "Records",
                    "Bytes",
                    "Output",
                    "Attachments",
                    "Hydrated",
                ]
                .iter()
                .any(|k| line.starts_with(k));
            assert!(known, "unexpected line in the message: {line:?}");
        }
    }
}
