//! The Grafana dashboard and the alert rules shipped in the chart
//! (`charts/epic-export-operator/dashboards/epic-export.json`, `.../rules/epic-export.rules.yaml`)
//! are consistent with the metrics the operator serves: the dashboard is a Grafana dashboard (schema
//! version, the datasource, namespace and export variables, panels with queries), every PromQL
//! expression parses, and every metric it names is in a real `/metrics` scrape of the operator's
//! HTTP endpoint; every alert has a summary, a description with a kubectl command, and a runbook
//! that exists in docs/src/monitoring.md.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use epic_export::operator::jwks::JwksMetrics;
use epic_export::operator::metrics::{
    ErrorLabels, ExportState, LastRunState, Metrics, OutcomeLabels,
};
use promql_parser::parser::Expr;
use promql_parser::util::{ExprVisitor, walk_expr};
use serde_json::Value;
use tower::ServiceExt;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/epic-export-operator");

fn dashboard() -> Value {
    let text = std::fs::read_to_string(format!("{CHART}/dashboards/epic-export.json")).unwrap();
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

fn rules() -> serde_json::Value {
    let text = std::fs::read_to_string(format!("{CHART}/rules/epic-export.rules.yaml")).unwrap();
    serde_yaml_ng::from_str(&text).expect("the rules are YAML")
}

/// A `/metrics` scrape of the operator's HTTP endpoint, with one export's gauges set, a finished run
/// and a reconcile error (a family without series is not in the exposition), and one of the JWK Set
/// server's.
async fn scrape() -> String {
    let metrics = Arc::new(Metrics::new());
    metrics
        .runs
        .get_or_create(&OutcomeLabels {
            outcome: "success".into(),
        })
        .inc();
    metrics
        .reconcile_errors
        .get_or_create(&ErrorLabels {
            reason: "api_500".into(),
        })
        .inc();
    metrics.set_export(
        "phi",
        "nightly",
        &ExportState {
            last_run: Some(LastRunState {
                outcome: "success".into(),
                duration: Some(60.0),
                records: 42,
                bytes: 4200,
                records_by_type: vec![("Patient".into(), 42)],
            }),
            last_success: Some(1_800_000_000.0),
            active_runs: 1,
            active_since: Some(1_800_000_100.0),
            stalled: false,
            rotation_phase: Some("Idle".into()),
            max_success_age: Some(7200.0),
            created: Some(1_700_000_000.0),
        },
    );
    let app = epic_export::operator::http::router(metrics, Arc::new(AtomicBool::new(true)));
    let operator = body(app).await;
    // The JWK Set server's, on its health port.
    let jwks = Arc::new(JwksMetrics::default());
    let app = epic_export::operator::http::health_and_metrics(
        Arc::new(AtomicBool::new(true)),
        move || jwks.encode(),
    );
    format!("{operator}{}", body(app).await)
}

/// The body of `GET /metrics`.
async fn body(app: axum::Router) -> String {
    let response = app
        .oneshot(
            http::Request::get("/metrics")
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

/// The series names a scrape can hold, from its `# TYPE` lines.
fn served_names(scrape: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in scrape.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').unwrap();
        match kind {
            "counter" => {
                names.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                names.insert(name.to_owned());
            }
        }
    }
    names
}

struct Names(BTreeSet<String>);

impl ExprVisitor for Names {
    type Error = ();
    fn pre_visit(&mut self, expr: &Expr) -> Result<bool, ()> {
        match expr {
            Expr::VectorSelector(vs) => {
                self.0.extend(vs.name.clone());
            }
            Expr::MatrixSelector(ms) => {
                self.0.extend(ms.vs.name.clone());
            }
            _ => {}
        }
        Ok(true)
    }
}

/// The metric names `expr` reads; panics naming it when it does not parse. Grafana's variables are
/// replaced by values first, as Grafana does.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let concrete = expr
        .replace("$__rate_interval", "5m")
        .replace("$__range", "7d")
        .replace("$__interval", "1m")
        .replace("$namespace", ".*")
        .replace("$export", ".*");
    assert!(!concrete.contains('$'), "an unknown variable in {expr}");
    let parsed = promql_parser::parser::parse(&concrete)
        .unwrap_or_else(|e| panic!("{expr} does not parse: {e}"));
    let mut names = Names(BTreeSet::new());
    walk_expr(&mut names, &parsed).unwrap();
    assert!(!names.0.is_empty(), "{expr} reads no metric");
    names.0
}

/// Every panel, also those nested in rows.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut all = Vec::new();
    for p in dashboard["panels"].as_array().expect("panels") {
        all.push(p);
        if let Some(nested) = p["panels"].as_array() {
            all.extend(nested);
        }
    }
    all
}

#[test]
fn the_dashboard_is_a_grafana_dashboard_with_the_variables() {
    let d = dashboard();
    assert!(d["schemaVersion"].as_u64().unwrap() >= 36, "schemaVersion");
    assert_eq!(d["uid"], "epic-export");
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()));
    let vars = d["templating"]["list"].as_array().unwrap();
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("variable {name}"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    for name in ["namespace", "export"] {
        let v = var(name);
        assert_eq!(v["type"], "query");
        assert!(
            v["query"]["query"]
                .as_str()
                .unwrap()
                .starts_with("label_values(")
        );
    }
    let mut ids = BTreeSet::new();
    let mut titles = Vec::new();
    for p in panels(&d) {
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "panel ids are unique"
        );
        let pos = &p["gridPos"];
        for k in ["x", "y", "w", "h"] {
            assert!(pos[k].as_u64().is_some(), "gridPos.{k} of {p}");
        }
        assert!(pos["x"].as_u64().unwrap() + pos["w"].as_u64().unwrap() <= 24);
        if p["type"] == "row" {
            continue;
        }
        titles.push(p["title"].as_str().unwrap().to_owned());
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{} has queries", p["title"]);
        for t in targets {
            assert!(t["expr"].as_str().is_some_and(|e| !e.is_empty()));
            assert!(t["refId"].as_str().is_some());
        }
    }
    // What the person on call looks for.
    for want in [
        "successful",
        "Outcome",
        "duration",
        "Records",
        "Bytes",
        "resource type",
        "Reconcile errors",
        "in progress",
        "Key rotation",
        "JWK Set",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(want)),
            "a panel about {want:?} in {titles:?}"
        );
    }
}

#[tokio::test]
async fn every_dashboard_query_parses_and_reads_served_metrics() {
    let served = served_names(&scrape().await);
    let d = dashboard();
    let mut exprs: Vec<String> = panels(&d)
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .map(|t| t["expr"].as_str().unwrap().to_owned())
        .collect();
    // The variables' queries read metrics too.
    for v in d["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"]["query"].as_str() {
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|q| q.rsplit_once(','))
                .map(|(selector, _)| selector.to_owned())
                .unwrap_or_else(|| panic!("{q}"));
            exprs.push(inner);
        }
    }
    for expr in exprs {
        for name in metric_names(&expr) {
            assert!(
                served.contains(&name),
                "{name} (in {expr}) is not served: {served:?}"
            );
        }
    }
}

#[tokio::test]
async fn every_alert_parses_reads_served_metrics_and_has_its_runbook() {
    let served = served_names(&scrape().await);
    let monitoring = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/src/monitoring.md"
    ))
    .unwrap();
    let rules = rules();
    let mut alerts = Vec::new();
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let alert = rule["alert"].as_str().unwrap();
            alerts.push(alert.to_owned());
            let expr = rule["expr"].as_str().unwrap();
            for name in metric_names(expr) {
                assert!(served.contains(&name), "{alert}: {name} is not served");
            }
            let a = &rule["annotations"];
            assert!(a["summary"].as_str().is_some_and(|s| !s.is_empty()));
            assert!(
                a["description"]
                    .as_str()
                    .is_some_and(|s| s.contains("kubectl ")),
                "{alert}: the description names a kubectl command"
            );
            let anchor = alert.to_lowercase();
            assert_eq!(
                a["runbook_url"].as_str(),
                Some(format!("RUNBOOK_BASE_URLmonitoring.html#{anchor}").as_str())
            );
            assert!(
                monitoring.contains(&format!("### {alert}")),
                "{alert} has a runbook section in monitoring.md"
            );
            assert!(
                ["warning", "critical"].contains(&rule["labels"]["severity"].as_str().unwrap()),
                "{alert}: severity"
            );
        }
    }
    for want in [
        "EpicExportNotSuccessful",
        "EpicExportLastRunFailed",
        "EpicExportStalled",
        "EpicExportRunTooLong",
        "EpicExportKeyRotationBlocked",
        "EpicExportOperatorDown",
        "EpicExportNoLeader",
        "EpicExportJwksErrors",
    ] {
        assert!(alerts.iter().any(|a| a == want), "{want} in {alerts:?}");
    }
}

#[tokio::test]
async fn the_scrape_shows_the_per_export_gauges() {
    let scrape = scrape().await;
    for line in [
        "epic_export_last_run_outcome{namespace=\"phi\",export=\"nightly\",outcome=\"success\"} 1",
        "epic_export_last_run_records{namespace=\"phi\",export=\"nightly\"} 42",
        "epic_export_runs_active{namespace=\"phi\",export=\"nightly\"} 1",
        "epic_export_key_rotation_phase{namespace=\"phi\",export=\"nightly\",phase=\"Idle\"} 1",
    ] {
        assert!(scrape.contains(line), "{line} in {scrape}");
    }
}

/// The docs' picture of the dashboard (`docs/src/images/dashboard.svg`) is drawn from a scrape of
/// three exports by `scripts/render_dashboard.py`, and is redrawn when the dashboard changes:
/// `UPDATE_DASHBOARD_PICTURE=1 cargo nextest run --test dashboards` writes it.
#[tokio::test]
async fn the_docs_picture_is_the_dashboard_of_today() {
    let metrics = Arc::new(Metrics::new());
    metrics.leader.set(1);
    let last = |outcome: &str, duration: f64, records: u64, types: &[(&str, u64)]| LastRunState {
        outcome: outcome.into(),
        duration: Some(duration),
        records,
        bytes: records * 1100,
        records_by_type: types.iter().map(|(t, n)| (t.to_string(), *n)).collect(),
    };
    let base = 1_800_000_000.0;
    for (name, run, success, phase) in [
        (
            "nightly-search",
            last(
                "success",
                412.0,
                182_340,
                &[("Observation", 150_002), ("Patient", 2_000)],
            ),
            Some(base),
            Some("Idle"),
        ),
        (
            "weekly-bulk",
            last("failed", 95.0, 0, &[]),
            Some(base - 8.0 * 86_400.0),
            Some("Blocked"),
        ),
        (
            "notes",
            last("partial", 1_830.0, 20_162, &[("DocumentReference", 20_162)]),
            Some(base - 86_400.0),
            None,
        ),
    ] {
        metrics.set_export(
            "phi",
            name,
            &ExportState {
                last_run: Some(run),
                last_success: success,
                active_runs: i64::from(name == "notes"),
                active_since: (name == "notes").then_some(base + 1_200.0),
                stalled: name == "weekly-bulk",
                rotation_phase: phase.map(str::to_owned),
                max_success_age: Some(if name == "weekly-bulk" {
                    8.0 * 86_400.0
                } else {
                    129_600.0
                }),
                created: Some(base - 90.0 * 86_400.0),
            },
        );
    }
    let app = epic_export::operator::http::router(metrics, Arc::new(AtomicBool::new(true)));
    let scrape = body(app).await;
    let dir = tempfile::tempdir().unwrap();
    let scrape_path = dir.path().join("scrape.txt");
    std::fs::write(&scrape_path, scrape).unwrap();
    let drawn = dir.path().join("dashboard.svg");
    let status = std::process::Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/render_dashboard.py"
        ))
        .arg(format!("{CHART}/dashboards/epic-export.json"))
        .arg(&scrape_path)
        .arg(&drawn)
        .status()
        .unwrap();
    assert!(status.success());
    let drawn = std::fs::read_to_string(&drawn).unwrap();
    let picture = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/src/images/dashboard.svg");
    if std::env::var_os("UPDATE_DASHBOARD_PICTURE").is_some() {
        std::fs::create_dir_all(std::path::Path::new(picture).parent().unwrap()).unwrap();
        std::fs::write(picture, &drawn).unwrap();
    }
    let committed = std::fs::read_to_string(picture).unwrap_or_default();
    assert!(
        committed == drawn,
        "{picture} is not the dashboard of today: run UPDATE_DASHBOARD_PICTURE=1 cargo nextest run --test dashboards"
    );
}
