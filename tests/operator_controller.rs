//! The real controller end to end against the in-process fake API server (`support/fake_api.rs`):
//! runs start as Jobs with the right name, mounts and security; finished Jobs land in status, Events
//! and metrics; a restarted operator adopts instead of duplicating; a missing Secret stalls until it
//! is created (looked at again periodically: Secrets are not watched); history is cleaned up; an idle
//! operator writes nothing; leader election lets one of two replicas act; a key rotation completes
//! while runs keep authenticating against the sandbox, which fetches the keys from the JWK Set
//! endpoint (a server of its own that may not read Secrets); only the Job's own pods report its run;
//! specs that cannot mean what they say (an image not allowed, plain http, credentials without TLS,
//! the YAML 1.1 `on` key) are Stalled naming the field; the e-mail trusts a certificate from a
//! ConfigMap.

#[path = "support/fake_api.rs"]
mod fake_api;
#[path = "support/smtp.rs"]
mod smtp;

use std::future::Future;
use std::time::Duration;

use epic_export::auth::keys::{Algorithm, SigningKey};
use epic_export::auth::token::{TokenSource, TokenSourceConfig};
use epic_export::operator::controller::Settings;
use epic_export::operator::controller::decide::on_demand_job_name;
use epic_export::operator::controller::rotation::RotationTiming;
use epic_export::operator::images::ImagePolicy;
use epic_export::operator::job::RunReportMessage;
use epic_export::operator::jwks::JwksSettings;
use epic_export::operator::lease::LeaseSettings;
use epic_export::operator::{ControllerOptions, run_controller};
use epic_export::sandbox::{ClientKeys, ClientRegistration, Sandbox, SandboxOptions};
use epic_export::schedule::job_name;
use fake_api::FakeApi;
use jiff::Timestamp;
use serde_json::{Value, json};
use tokio::sync::oneshot;

const NS: &str = "phi";
const EXPORTS: &str = "apis/fhirexport.dev/v1alpha1/epicexports";
const JOBS: &str = "apis/batch/v1/jobs";
const EVENTS: &str = "apis/events.k8s.io/v1/events";
const IMAGE: &str = "registry.example/epic-export:1.0";

/// The key Secret `epic-key` with a new ES384 key; returns the key's PEM as stored (base64).
fn secret(fake: &FakeApi) -> String {
    let key = SigningKey::generate(Algorithm::ES384).unwrap();
    let pem = base64(&key.to_pkcs8_pem().unwrap());
    fake.put(
        "api/v1/secrets",
        json!({"metadata": {"name": "epic-key", "namespace": NS}, "data": {"private.pem": pem}}),
    );
    pem
}

fn config_map(fake: &FakeApi) {
    fake.put(
        "api/v1/configmaps",
        json!({"metadata": {"name": "roster", "namespace": NS}, "data": {"roster.csv": "patient_id\nabc\n"}}),
    );
}

/// An hourly export whose last run was two hours ago, so one run is due now.
fn export(fake: &FakeApi, name: &str, extra_spec: Value, annotations: Value) -> Value {
    let two_hours_ago = Timestamp::from_second(Timestamp::now().as_second() - 7200).unwrap();
    let mut spec = json!({
        "schedule": "0 * * * *",
        "fhir": {"baseUrl": "https://fhir.example.org/api/FHIR/R4"},
        "auth": {"clientId": "abc", "keySecretRef": {"name": "epic-key", "key": "private.pem"}},
        "source": {"search": {"rosterRef": {"configMapName": "roster", "key": "roster.csv"}, "resources": [{"type": "Patient"}]}},
        "output": {"volumeClaimName": "exports"},
        "successfulRunsHistoryLimit": 3,
        "failedRunsHistoryLimit": 1,
        "concurrencyPolicy": "Forbid",
    });
    json_merge(&mut spec, extra_spec);
    fake.put(
        EXPORTS,
        json!({
            "metadata": {"name": name, "namespace": NS, "annotations": annotations},
            "spec": spec,
            "status": {"lastScheduleTime": two_hours_ago.to_string()},
        }),
    )
}

fn json_merge(target: &mut Value, patch: Value) {
    if let (Some(t), Value::Object(p)) = (target.as_object_mut(), patch) {
        for (k, v) in p {
            t.insert(k, v);
        }
    }
}

/// The slot due now for an hourly schedule: the start of this hour.
fn this_hour() -> Timestamp {
    let now = Timestamp::now().as_second();
    Timestamp::from_second(now - now.rem_euclid(3600)).unwrap()
}

/// The scheduled run of `export`: the one Job labelled with it, whose name must be the deterministic
/// one for the hour it was scheduled for (this hour, or the next if the test crossed the hour).
async fn scheduled_run(fake: &FakeApi, export: &str) -> (String, Timestamp) {
    let hour = this_hour();
    let job = eventually("the run's Job", || async {
        fake.list(JOBS, Some(NS))
            .into_iter()
            .find(|j| j["metadata"]["labels"]["fhirexport.dev/export"] == export)
    })
    .await;
    let name = job["metadata"]["name"].as_str().unwrap().to_owned();
    let slot = [hour, hour + jiff::SignedDuration::from_hours(1)]
        .into_iter()
        .find(|slot| job_name(export, *slot) == name)
        .unwrap_or_else(|| panic!("{name} is not the run for {hour} (or the hour after)"));
    (name, slot)
}

struct Operator {
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<Result<u8, epic_export::operator::Error>>,
}

impl Operator {
    fn start(
        fake: &FakeApi,
        lease: Option<LeaseSettings>,
        http: Option<std::net::SocketAddr>,
    ) -> Operator {
        Operator::start_with(fake, Operator::options(lease, http))
    }

    fn options(
        lease: Option<LeaseSettings>,
        http: Option<std::net::SocketAddr>,
    ) -> ControllerOptions {
        let mut settings = Settings::new(ImagePolicy::only(IMAGE));
        settings.identity = lease
            .as_ref()
            .map(|l| l.identity.clone())
            .unwrap_or("op-0".into());
        ControllerOptions {
            settings,
            http_addr: http,
            leader_election: lease,
        }
    }

    fn start_with(fake: &FakeApi, options: ControllerOptions) -> Operator {
        let (tx, rx) = oneshot::channel();
        let done = tokio::spawn(run_controller(fake.client(), options, async {
            let _ = rx.await;
        }));
        Operator {
            stop: Some(tx),
            done,
        }
    }

    async fn stop(mut self) -> u8 {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.done)
            .await
            .expect("stops within 10 s")
            .unwrap()
            .unwrap()
    }
}

/// Polls `probe` every 50 ms until it gives a value; fails after 15 s.
async fn eventually<T, F, Fut>(what: &str, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_within(what, Duration::from_secs(15), probe).await
}

/// Polls `probe` every 50 ms until it gives a value; fails after `limit`.
async fn eventually_within<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn status(fake: &FakeApi, name: &str) -> Value {
    fake.get(EXPORTS, NS, name)
        .map(|o| o["status"].clone())
        .unwrap_or(Value::Null)
}

fn condition(status: &Value, kind: &str) -> Value {
    status["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == kind)
        .cloned()
        .unwrap_or(Value::Null)
}

fn event_reasons(fake: &FakeApi, name: &str) -> Vec<String> {
    fake.list(EVENTS, Some(NS))
        .into_iter()
        .filter(|e| e["regarding"]["name"] == name)
        .map(|e| e["reason"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn report(outcome: &str, records: u64) -> String {
    serde_json::to_string(&RunReportMessage {
        outcome: outcome.into(),
        run_id: "20261201T020000Z".into(),
        records,
        bytes: records * 100,
        records_by_type: [("Patient".to_string(), records)].into(),
        output_dir: "/data/nightly/20261201T020000Z".into(),
        ..RunReportMessage::default()
    })
    .unwrap()
}

fn job_posts(fake: &FakeApi) -> usize {
    fake.requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/jobs"))
        .count()
}

/// Whether `r` starts a reconcile pass of an export in `phi`: every pass reads the key Secret
/// `epic-key` by name first (Secrets are not watched).
fn starts_pass(r: &fake_api::Request) -> bool {
    r.method == "GET" && r.path == "/api/v1/namespaces/phi/secrets/epic-key"
}

/// The reconcile passes begun after the first `mark` requests.
fn passes_since(fake: &FakeApi, mark: usize) -> usize {
    fake.requests()[mark..]
        .iter()
        .filter(|r| starts_pass(r))
        .count()
}

/// A resync short enough that waiting for a few passes proves the operator looked and did nothing.
const RESYNC: Duration = Duration::from_millis(200);

#[tokio::test]
async fn a_due_run_becomes_a_job_and_its_report_lands_in_status_events_and_metrics() {
    let fake = FakeApi::new();
    let pem = secret(&fake);
    config_map(&fake);
    export(&fake, "nightly", json!({}), json!({}));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut options = Operator::options(None, Some(port));
    options.settings.resync = RESYNC;
    let op = Operator::start_with(&fake, options);

    let (name, slot) = scheduled_run(&fake, "nightly").await;
    let job = fake.get(JOBS, NS, &name).unwrap();
    // Owned, labelled, locked down, with the key mounted read-only and no secret in the spec.
    let owner = &job["metadata"]["ownerReferences"][0];
    assert_eq!(
        (owner["kind"].as_str(), owner["controller"].as_bool()),
        (Some("EpicExport"), Some(true))
    );
    assert_eq!(
        job["metadata"]["labels"]["fhirexport.dev/export"],
        "nightly"
    );
    let pod = &job["spec"]["template"]["spec"];
    assert_eq!(pod["restartPolicy"], "Never");
    let container = &pod["containers"][0];
    assert_eq!(container["image"], IMAGE);
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        container["securityContext"]["capabilities"]["drop"],
        json!(["ALL"])
    );
    let key = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "key")
        .unwrap();
    assert_eq!(key["secret"]["secretName"], "epic-key");
    assert_eq!(key["secret"]["defaultMode"], 0o400);
    assert!(
        !job.to_string().contains(&pem),
        "no key material in the Job"
    );

    let s = eventually("Running in status", || async {
        let s = status(&fake, "nightly");
        (condition(&s, "Running")["status"] == "True").then_some(s)
    })
    .await;
    assert_eq!(s["active"], json!([name]));
    assert_eq!(s["lastScheduleTime"], slot.to_string());
    assert_eq!(condition(&s, "Ready")["status"], "True");
    assert!(s["nextScheduleTime"].as_str().is_some());

    // While it runs: the run in progress and when it started (for EpicExportRunTooLong).
    let scrape = || async {
        reqwest::get(format!("http://{port}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let running = eventually("the run in progress in the metrics", || async {
        let m = scrape().await;
        m.contains("epic_export_runs_active{namespace=\"phi\",export=\"nightly\"} 1")
            .then_some(m)
    })
    .await;
    assert!(
        running.contains(
            "epic_export_active_run_started_timestamp_seconds{namespace=\"phi\",export=\"nightly\"}"
        ),
        "{running}"
    );

    fake.start_job(NS, &name);
    fake.finish_job(NS, &name, true, &report("success", 42));
    let s = eventually("lastRun in status", || async {
        let s = status(&fake, "nightly");
        (s["lastRun"]["jobName"] == name.as_str() && condition(&s, "Running")["status"] == "False")
            .then_some(s)
    })
    .await;
    assert_eq!(s["lastRun"]["outcome"], "success");
    assert_eq!(s["lastRun"]["records"], 42);
    assert_eq!(s["lastRun"]["recordsByType"]["Patient"], 42);
    assert!(s["lastSuccessfulTime"].as_str().is_some());
    assert_eq!(s["active"], Value::Null, "no active runs");

    let reasons = eventually("the RunSucceeded Event", || async {
        let r = event_reasons(&fake, "nightly");
        r.contains(&"RunSucceeded".to_string()).then_some(r)
    })
    .await;
    assert!(reasons.contains(&"RunStarted".to_string()), "{reasons:?}");
    assert_eq!(job_posts(&fake), 1, "exactly one Job created");

    let metrics = reqwest::get(format!("http://{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("epic_export_runs_total{outcome=\"success\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("epic_export_records_exported_total 42"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "epic_export_last_success_timestamp_seconds{namespace=\"phi\",export=\"nightly\"}"
        ),
        "{metrics}"
    );
    assert!(
        !metrics.contains("epic_export_active_run_started_timestamp_seconds{"),
        "no run in progress: {metrics}"
    );
    // The per-export gauges the dashboard and the alerts read.
    for line in [
        "epic_export_last_run_records{namespace=\"phi\",export=\"nightly\"} 42",
        "epic_export_last_run_records_by_type{namespace=\"phi\",export=\"nightly\",resource_type=\"Patient\"} 42",
        "epic_export_last_run_outcome{namespace=\"phi\",export=\"nightly\",outcome=\"success\"} 1",
        "epic_export_last_run_outcome{namespace=\"phi\",export=\"nightly\",outcome=\"failed\"} 0",
        "epic_export_runs_active{namespace=\"phi\",export=\"nightly\"} 0",
        "epic_export_stalled{namespace=\"phi\",export=\"nightly\"} 0",
        "epic_export_leader 1",
        "epic_export_last_run_bytes{namespace=\"phi\",export=\"nightly\"}",
        "epic_export_last_run_duration_seconds{namespace=\"phi\",export=\"nightly\"}",
        // Hourly: an hour between runs and an hour for the run.
        "epic_export_max_success_age_seconds{namespace=\"phi\",export=\"nightly\"} 7200.0",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    assert_eq!(
        reqwest::get(format!("http://{port}/healthz"))
            .await
            .unwrap()
            .status(),
        200
    );
    eventually("/readyz", || async {
        let status = reqwest::get(format!("http://{port}/readyz"))
            .await
            .ok()?
            .status();
        (status == 200).then_some(())
    })
    .await;

    // Steady state: an idle operator writes nothing (no hot loop on its own status writes). Once a
    // whole pass has written nothing (the finished run's writes are done), mark the start of the
    // next pass; over three more whole passes (every `resync`) nothing is written, and each pass
    // reads only what it must (the Secret, the ConfigMap, the export's Jobs).
    let mark = eventually("a whole pass that writes nothing", || async {
        let log = fake.requests();
        let quiet = log
            .iter()
            .rposition(|r| r.method != "GET")
            .map_or(0, |i| i + 1);
        log.iter()
            .enumerate()
            .skip(quiet)
            .filter(|(_, r)| starts_pass(r))
            .nth(1)
            .map(|(i, _)| i)
    })
    .await;
    const PASSES: usize = 3;
    let log = eventually("three more reconcile passes", || async {
        (passes_since(&fake, mark) > PASSES).then(|| fake.requests())
    })
    .await;
    let writes = fake.writes_since(mark);
    assert!(writes.is_empty(), "idle writes: {writes:?}");
    let passes: Vec<usize> = log
        .iter()
        .enumerate()
        .skip(mark)
        .filter(|(_, r)| starts_pass(r))
        .map(|(i, _)| i)
        .collect();
    for pass in passes.windows(2).take(PASSES) {
        let reads = &log[pass[0]..pass[1]];
        assert!(reads.len() <= 3, "idle reads in one pass: {reads:?}");
    }
    assert_eq!(op.stop().await, 0);
}

#[tokio::test]
async fn a_restarted_operator_adopts_the_run_it_had_started() {
    let fake = FakeApi::new();
    secret(&fake);
    config_map(&fake);
    export(&fake, "nightly", json!({}), json!({}));
    let first = Operator::start(&fake, None, None);
    let (name, slot) = scheduled_run(&fake, "nightly").await;
    first.stop().await;
    // The status write of that pass was lost: lastScheduleTime is back to two hours ago.
    let mut obj = fake.get(EXPORTS, NS, "nightly").unwrap();
    let two_hours_ago = Timestamp::from_second(Timestamp::now().as_second() - 7200).unwrap();
    obj["status"] = json!({"lastScheduleTime": two_hours_ago.to_string()});
    fake.put(EXPORTS, obj);

    let second = Operator::start(&fake, None, None);
    eventually("the slot recorded again", || async {
        (status(&fake, "nightly")["lastScheduleTime"] == slot.to_string()).then_some(())
    })
    .await;
    assert_eq!(status(&fake, "nightly")["active"], json!([name]));
    assert_eq!(job_posts(&fake), 1, "no duplicate run");
    assert_eq!(fake.list(JOBS, Some(NS)).len(), 1);
    second.stop().await;
}

#[tokio::test]
async fn a_missing_secret_stalls_until_it_is_created() {
    let fake = FakeApi::new();
    config_map(&fake);
    export(&fake, "nightly", json!({}), json!({}));
    let mut options = Operator::options(None, None);
    options.settings.reference_retry = Duration::from_millis(500);
    let op = Operator::start_with(&fake, options);

    let s = eventually("Stalled", || async {
        let s = status(&fake, "nightly");
        (condition(&s, "Stalled")["status"] == "True").then_some(s)
    })
    .await;
    let stalled = condition(&s, "Stalled");
    assert_eq!(stalled["reason"], "SecretNotFound");
    let message = stalled["message"].as_str().unwrap();
    assert!(
        message.contains("spec.auth.keySecretRef") && message.contains("epic-key"),
        "{message}"
    );
    assert_eq!(condition(&s, "Ready")["status"], "False");
    assert!(fake.list(JOBS, Some(NS)).is_empty(), "no run while stalled");

    // Looking again (the Secret is read by name, not watched), but writing nothing while nothing
    // changes, and never listing or watching Secrets: over three more looks once the Stalled pass
    // is done (its Event is its last write).
    eventually("the Stalled Event", || async {
        event_reasons(&fake, "nightly")
            .contains(&"SecretNotFound".to_owned())
            .then_some(())
    })
    .await;
    let mark = fake.requests().len();
    eventually("three more looks at the Secret", || async {
        let looks = fake.requests()[mark..]
            .iter()
            .filter(|r| r.path.ends_with("/secrets/epic-key"))
            .count();
        (looks > 3).then_some(())
    })
    .await;
    assert!(fake.writes_since(mark).is_empty());
    let secret_reads: Vec<_> = fake.requests()[mark..]
        .iter()
        .filter(|r| r.path.contains("/secrets"))
        .map(|r| r.verb())
        .collect();
    assert!(
        !secret_reads.is_empty() && secret_reads.iter().all(|v| *v == "get"),
        "{secret_reads:?}"
    );
    assert!(
        fake.requests().iter().all(|r| !(r.path.contains("/secrets")
            || r.path.contains("/configmaps"))
            || r.verb() == "get"),
        "Secrets and ConfigMaps are only read by name"
    );
    assert_eq!(
        event_reasons(&fake, "nightly")
            .iter()
            .filter(|r| *r == "SecretNotFound")
            .count(),
        1,
        "one Warning Event"
    );

    // Creating the Secret heals the export at the next look.
    secret(&fake);
    let s = eventually("Ready after the fix", || async {
        let s = status(&fake, "nightly");
        (condition(&s, "Ready")["status"] == "True").then_some(s)
    })
    .await;
    assert_eq!(condition(&s, "Stalled")["status"], "False");
    scheduled_run(&fake, "nightly").await;
    op.stop().await;
}

#[tokio::test]
async fn run_now_and_history_limits() {
    let fake = FakeApi::new();
    secret(&fake);
    config_map(&fake);
    export(
        &fake,
        "adhoc",
        json!({"suspend": true, "successfulRunsHistoryLimit": 1}),
        json!({"fhirexport.dev/run-now": "one"}),
    );
    let op = Operator::start(&fake, None, None);
    let first = on_demand_job_name("adhoc", "one");
    eventually("the on-demand run", || async { fake.get(JOBS, NS, &first) }).await;
    assert_eq!(status(&fake, "adhoc")["runNowHandled"], "one");
    assert_eq!(
        fake.list(JOBS, Some(NS)).len(),
        1,
        "suspended: no scheduled run, only the asked one"
    );
    fake.finish_job(NS, &first, true, &report("success", 1));
    eventually("first run recorded", || async {
        (status(&fake, "adhoc")["lastRun"]["jobName"] == first.as_str()).then_some(())
    })
    .await;

    let mut obj = fake.get(EXPORTS, NS, "adhoc").unwrap();
    obj["metadata"]["annotations"]["fhirexport.dev/run-now"] = json!("two");
    fake.put(EXPORTS, obj);
    let second = on_demand_job_name("adhoc", "two");
    eventually("the second on-demand run", || async {
        fake.get(JOBS, NS, &second)
    })
    .await;
    fake.finish_job(NS, &second, true, &report("success", 2));
    eventually("history limit 1: the first run is deleted", || async {
        fake.get(JOBS, NS, &first).is_none().then_some(())
    })
    .await;
    assert!(fake.get(JOBS, NS, &second).is_some());
    let s = status(&fake, "adhoc");
    assert_eq!(s["lastRun"]["jobName"], second.as_str());
    assert_eq!(s["nextScheduleTime"], Value::Null, "suspended");
    op.stop().await;
}

#[tokio::test]
async fn of_two_replicas_only_the_leader_acts_and_a_standby_takes_over() {
    let fake = FakeApi::new();
    secret(&fake);
    config_map(&fake);
    let lease = |id: &str| LeaseSettings {
        namespace: "epic-export-system".into(),
        name: "epic-export-operator".into(),
        identity: id.into(),
        duration: Duration::from_secs(2),
        renew_every: Duration::from_millis(300),
    };
    const LEASES: &str = "apis/coordination.k8s.io/v1/leases";
    let a = Operator::start(&fake, Some(lease("a")), None);
    eventually("a leads", || async {
        fake.get(LEASES, "epic-export-system", "epic-export-operator")
            .filter(|l| l["spec"]["holderIdentity"] == "a")
    })
    .await;
    let b = Operator::start(&fake, Some(lease("b")), None);
    export(&fake, "nightly", json!({}), json!({}));
    let (name, _) = scheduled_run(&fake, "nightly").await;
    // b has had its chances while a renewed the lease twice (renewTime changed twice) and b looked
    // at it at least twice (a renewal is a read and a write; b only reads while a holds it).
    let lease_path =
        "/apis/coordination.k8s.io/v1/namespaces/epic-export-system/leases/epic-export-operator";
    let mark = fake.requests().len();
    let renewals = std::cell::RefCell::new(Vec::<Value>::new());
    eventually("two renewals by a while b looks", || async {
        let lease = fake.get(LEASES, "epic-export-system", "epic-export-operator")?;
        let mut seen = renewals.borrow_mut();
        let renewed = &lease["spec"]["renewTime"];
        if !seen.contains(renewed) {
            seen.push(renewed.clone());
        }
        let on_lease = |method: &str| {
            fake.requests()[mark..]
                .iter()
                .filter(|r| r.path == lease_path && r.method == method)
                .count()
        };
        // The first value seen is from before the renewals; the reads not followed by a write are
        // b's, but for one of a's whose write may still be in flight.
        let b_looks = on_lease("GET").saturating_sub(on_lease("PUT") + 1);
        (seen.len() > 2 && b_looks >= 2).then_some(())
    })
    .await;
    let lease_now = fake
        .get(LEASES, "epic-export-system", "epic-export-operator")
        .unwrap();
    assert_eq!(lease_now["spec"]["holderIdentity"], "a", "b stands by");
    let events = fake.list(EVENTS, Some(NS));
    assert!(
        events.iter().all(|e| e["reportingInstance"] == "a"),
        "only the leader acts: {events:?}"
    );

    // a shuts down and releases the lease; b takes over and acts.
    assert_eq!(a.stop().await, 0);
    eventually("b leads", || async {
        fake.get(LEASES, "epic-export-system", "epic-export-operator")
            .filter(|l| l["spec"]["holderIdentity"] == "b")
    })
    .await;
    let mut obj = fake.get(EXPORTS, NS, "nightly").unwrap();
    obj["metadata"]["annotations"] = json!({"fhirexport.dev/run-now": "now"});
    fake.put(EXPORTS, obj);
    fake.finish_job(NS, &name, true, &report("success", 5));
    eventually("b starts the on-demand run", || async {
        fake.get(JOBS, NS, &on_demand_job_name("nightly", "now"))
    })
    .await;
    assert_eq!(b.stop().await, 0);
}

/// One e-mail per finished run, sent by the controller with the Secret's credentials, also for a
/// run whose pod never reported (killed past its deadline); the result lands in `lastRun`.
#[tokio::test]
async fn each_finished_run_sends_one_email_even_when_the_pod_never_reported() {
    let server = smtp::smtp_server("none").await;
    let fake = FakeApi::new();
    secret(&fake);
    config_map(&fake);
    fake.put(
        "api/v1/secrets",
        json!({"metadata": {"name": "smtp", "namespace": NS}, "data": {
            "username": base64(smtp::USER), "password": base64(smtp::PASSWORD)}}),
    );
    export(
        &fake,
        "nightly",
        json!({"notify": {"email": {
            "host": "127.0.0.1", "port": server.port, "tls": "none",
            "from": "exports@example.org", "to": ["team@example.org"],
            "smtpSecretRef": {"name": "smtp"}}}}),
        json!({}),
    );
    let mut options = Operator::options(None, None);
    options.settings.resync = RESYNC;
    let op = Operator::start_with(&fake, options);
    let (name, _) = scheduled_run(&fake, "nightly").await;
    fake.finish_job(NS, &name, true, &report("success", 42));
    let s = eventually("the e-mail recorded in lastRun", || async {
        let s = status(&fake, "nightly");
        s["lastRun"]["notification"].as_str().is_some().then_some(s)
    })
    .await;
    assert_eq!(s["lastRun"]["notification"], "sent to 1 recipient", "{s}");
    let mail = |n: u32| server.maildir.path().join(format!("{n}.json"));
    let first: Value = serde_json::from_str(&std::fs::read_to_string(mail(1)).unwrap()).unwrap();
    assert_eq!(
        first["subject"],
        "[epic-export] nightly: success — 42 records"
    );

    // A run killed by Kubernetes leaves no report: the e-mail says so, once.
    let mut obj = fake.get(EXPORTS, NS, "nightly").unwrap();
    obj["metadata"]["annotations"] = json!({"fhirexport.dev/run-now": "again"});
    fake.put(EXPORTS, obj);
    let again = on_demand_job_name("nightly", "again");
    eventually("the second run", || async { fake.get(JOBS, NS, &again) }).await;
    let mut job = fake.get(JOBS, NS, &again).unwrap();
    job["status"] = json!({"failed": 1, "conditions": [{"type": "Failed", "status": "True",
        "reason": "DeadlineExceeded", "message": "Job was active longer than specified deadline",
        "lastTransitionTime": Timestamp::now().to_string()}]});
    fake.put(JOBS, job);
    // The server writes `<n>.eml` last, once the message is whole.
    eventually("the second e-mail", || async {
        server.maildir.path().join("2.eml").exists().then_some(())
    })
    .await;
    let second: Value = serde_json::from_str(&std::fs::read_to_string(mail(2)).unwrap()).unwrap();
    assert_eq!(
        second["subject"],
        "[epic-export] nightly: failed — 0 records"
    );
    // Steady state: no third message over three more whole passes of the export (every `resync`).
    let mark = fake.requests().len();
    eventually("three more reconcile passes", || async {
        (passes_since(&fake, mark) > 3).then_some(())
    })
    .await;
    assert!(!mail(3).exists(), "one e-mail per run");
    assert_eq!(
        status(&fake, "nightly")["lastRun"]["notification"],
        "sent to 1 recipient"
    );
    op.stop().await;
}

fn base64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// What an export pod does first: sign an assertion with the key it was given and get a token from
/// the sandbox, which checks the signature against the operator's JWK Set URL. Returns the kid.
async fn authenticate(key_pem: &[u8], sandbox: &Sandbox, jwks_url: &str) -> Result<String, String> {
    let key = SigningKey::from_pem(key_pem, std::path::Path::new("private.pem"), None, None)
        .map_err(|e| e.to_string())?;
    let kid = key.kid().to_owned();
    let tokens = TokenSource::new(
        reqwest::Client::new(),
        TokenSourceConfig {
            client_id: "abc".into(),
            token_url: sandbox.token_url(),
            scope: "system/Patient.read".into(),
            key,
            jku: Some(jwks_url.to_owned()),
        },
    );
    tokens
        .request()
        .await
        .map(|_| kid)
        .map_err(|e| e.to_string())
}

/// The key an export pod created now would mount: the Secret's `private.pem`.
fn mounted_key(fake: &FakeApi) -> Vec<u8> {
    use base64::Engine;
    let secret = fake.get("api/v1/secrets", NS, "epic-key").unwrap();
    base64::engine::general_purpose::STANDARD
        .decode(secret["data"]["private.pem"].as_str().unwrap())
        .unwrap()
}

fn secret_keys(fake: &FakeApi) -> Vec<String> {
    let secret = fake.get("api/v1/secrets", NS, "epic-key").unwrap();
    secret["data"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

/// A whole key rotation on request, with the sandbox configured like Epic for a JWK Set URL (it
/// fetches the operator's endpoint and caches it per Cache-Control): a run that started before the
/// rotation keeps renewing its token with the old key until it ends, new runs sign with whatever the
/// Secret holds at their start, and not one token request fails. Then the old key is gone from the
/// JWKS and from the Secret, and no longer accepted.
#[tokio::test]
async fn a_key_rotation_completes_while_runs_keep_authenticating_against_the_jwks_url() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let jwks_addr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let jwks_url = format!("http://{jwks_addr}/jwks/{NS}/nightly.json");
    sandbox.register_client(ClientRegistration {
        client_id: "abc".into(),
        keys: ClientKeys::JwksUrl(jwks_url.clone()),
    });
    let fake = FakeApi::new();
    let first = SigningKey::generate(Algorithm::ES384).unwrap();
    fake.put(
        "api/v1/secrets",
        json!({"metadata": {"name": "epic-key", "namespace": NS}, "data": {
            "private.pem": base64(&first.to_pkcs8_pem().unwrap())}}),
    );
    config_map(&fake);
    export(
        &fake,
        "nightly",
        json!({
            "fhir": {"baseUrl": sandbox.base_url()},
            "auth": {"clientId": "abc", "keySecretRef": {"name": "epic-key", "key": "private.pem"},
                     "jwksUrl": jwks_url, "rotation": {"every": "90d"}},
        }),
        json!({}),
    );
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut options = Operator::options(None, Some(metrics_port));
    options.settings.rotation = RotationTiming {
        cache_lifetime: Duration::from_secs(1),
        margin: Duration::from_secs(1),
        last_use_grace: Duration::from_secs(2),
    };
    let op = Operator::start_with(&fake, options);
    // The JWK Set endpoint, whose client RBAC-like refuses anything but EpicExports.
    let jwks_client = fake.client_forbidding(|r| !r.path.ends_with("/epicexports"));
    let listener = tokio::net::TcpListener::bind(jwks_addr).await.unwrap();
    let _jwks = epic_export::task::AbortOnDrop(tokio::spawn(epic_export::operator::jwks::serve(
        jwks_client,
        None,
        listener,
        JwksSettings {
            max_age: Duration::from_secs(1),
            rotation_max_age: Duration::from_secs(1),
        },
        std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
    )));

    // The run due now starts with the first key and authenticates through the JWK Set URL.
    let (old_run, _) = scheduled_run(&fake, "nightly").await;
    let old_key = mounted_key(&fake);
    let kid = eventually("the first run's token", || async {
        authenticate(&old_key, &sandbox, &jwks_url).await.ok()
    })
    .await;
    assert_eq!(kid, first.kid());
    let idle = eventually("rotation status Idle", || async {
        let s = status(&fake, "nightly");
        (s["keyRotation"]["phase"] == "Idle").then_some(s)
    })
    .await;
    assert_eq!(idle["keyRotation"]["signingKid"], first.kid());
    // The rotation phase in the metrics (the dashboard's panel, EpicExportKeyRotationBlocked).
    eventually("the rotation phase in the metrics", || async {
        let m = reqwest::get(format!("http://{metrics_port}/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        (m.contains(
            "epic_export_key_rotation_phase{namespace=\"phi\",export=\"nightly\",phase=\"Idle\"} 1",
        ) && m.contains(
            "epic_export_key_rotation_phase{namespace=\"phi\",export=\"nightly\",phase=\"Blocked\"} 0",
        ))
        .then_some(())
    })
    .await;
    assert!(
        idle["keyRotation"]["nextRotationTime"].is_string(),
        "{idle}"
    );

    // Runs keep authenticating all along: the old run renews with the old key, new runs use the
    // Secret's key of the moment.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let old_run_active = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let tokens = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let runs = {
        let (fake, jwks_url, stop, old_run_active, tokens) = (
            fake.clone(),
            jwks_url.clone(),
            stop.clone(),
            old_run_active.clone(),
            tokens.clone(),
        );
        let sandbox = &sandbox;
        async move {
            let mut kids = Vec::new();
            let mut failures = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if old_run_active.load(std::sync::atomic::Ordering::SeqCst)
                    && let Err(e) = authenticate(&old_key, sandbox, &jwks_url).await
                {
                    failures.push(format!("old run: {e}"));
                }
                match authenticate(&mounted_key(&fake), sandbox, &jwks_url).await {
                    Ok(kid) => {
                        kids.push(kid);
                        tokens.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    Err(e) => failures.push(format!("new run: {e}")),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (kids, failures)
        }
    };
    let rotation = async {
        let mut obj = fake.get(EXPORTS, NS, "nightly").unwrap();
        obj["metadata"]["annotations"] = json!({"fhirexport.dev/rotate-key": "2026-12-02"});
        fake.put(EXPORTS, obj);
        let retiring = eventually("the switch to the next key", || async {
            let s = status(&fake, "nightly");
            (s["keyRotation"]["phase"] == "Retiring").then_some(s)
        })
        .await;
        let next_kid = retiring["keyRotation"]["signingKid"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_ne!(next_kid, first.kid());
        assert_eq!(retiring["keyRotation"]["retiringKid"], first.kid());
        assert_eq!(secret_keys(&fake), ["private.pem", "retiring-private.pem"]);
        // While the run from before the switch is active, the old key stays published: still so
        // once it would have gone without that run (the switch + margin + grace, here 3 s), with a
        // second to spare for the pass that would have retired it.
        let switched: Timestamp = retiring["keyRotation"]["switchedAt"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let would_retire = switched + jiff::SignedDuration::from_secs(3 + 1);
        let wait = Timestamp::now().duration_until(would_retire);
        tokio::time::sleep(Duration::try_from(wait).unwrap_or_default()).await;
        let s = status(&fake, "nightly");
        assert_eq!(s["keyRotation"]["phase"], "Retiring", "{s}");
        assert!(
            s["keyRotation"]["message"]
                .as_str()
                .unwrap()
                .contains(&old_run),
            "{s}"
        );
        // The old run ends; 5 minutes (here 2 s) after its last use plus the margin, the key goes.
        old_run_active.store(false, std::sync::atomic::Ordering::SeqCst);
        fake.finish_job(NS, &old_run, true, &report("success", 1));
        let done = eventually("the old key retired", || async {
            let s = status(&fake, "nightly");
            (s["keyRotation"]["phase"] == "Idle" && s["keyRotation"]["retiringKid"].is_null())
                .then_some(s)
        })
        .await;
        assert_eq!(done["keyRotation"]["requestHandled"], "2026-12-02");
        assert!(done["keyRotation"]["lastRotationTime"].is_string());
        // New runs go on authenticating after the old key is gone.
        let before = tokens.load(std::sync::atomic::Ordering::SeqCst);
        eventually("two more tokens after the retirement", || async {
            (tokens.load(std::sync::atomic::Ordering::SeqCst) >= before + 2).then_some(())
        })
        .await;
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        next_kid
    };
    let (next_kid, (kids, failures)) = tokio::join!(rotation, runs);
    assert_eq!(
        failures,
        Vec::<String>::new(),
        "every token request succeeded"
    );
    assert!(
        kids.contains(&first.kid().to_owned()) && kids.contains(&next_kid),
        "{kids:?}"
    );
    assert_eq!(secret_keys(&fake), ["private.pem"]);

    // The JWKS now holds only the new key, and the old key is refused (the sandbox refetches the
    // set when a kid is unknown to its cache).
    let doc: Value = reqwest::get(&jwks_url).await.unwrap().json().await.unwrap();
    let published: Vec<&str> = doc["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(published, [next_kid.as_str()]);
    // Refused once the sandbox's copy of the set (max-age 1 s) has expired.
    let old_pem = first.to_pkcs8_pem().unwrap();
    eventually_within(
        "the retired key refused",
        Duration::from_millis(1500),
        || async {
            authenticate(old_pem.as_bytes(), &sandbox, &jwks_url)
                .await
                .is_err()
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        authenticate(&mounted_key(&fake), &sandbox, &jwks_url).await,
        Ok(next_kid.clone())
    );
    assert_eq!(
        fake.forbidden(),
        Vec::new(),
        "the JWKS server read only EpicExports"
    );
    let reasons = event_reasons(&fake, "nightly");
    for reason in [
        "KeyRotationStarted",
        "NextKeyPublished",
        "SigningKeySwitched",
        "OldKeyRetired",
    ] {
        assert_eq!(
            reasons.iter().filter(|r| *r == reason).count(),
            1,
            "{reason} in {reasons:?}"
        );
    }
    op.stop().await;
}

/// The run report comes only from a pod the Job owns: a pod labelled `job-name=<job>` by someone else
/// (or not owned at all), even one that finished later, is ignored.
#[tokio::test]
async fn only_the_jobs_own_pods_report_its_run() {
    let fake = FakeApi::new();
    secret(&fake);
    config_map(&fake);
    export(&fake, "nightly", json!({}), json!({}));
    let op = Operator::start(&fake, None, None);
    let (name, _) = scheduled_run(&fake, "nightly").await;
    for (pod, owners) in [
        (
            "impostor-owned",
            json!([{"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": "someone-else",
                    "controller": true}]),
        ),
        ("impostor-unowned", json!([])),
    ] {
        fake.put(
            "api/v1/pods",
            json!({
                "metadata": {"name": pod, "namespace": NS, "labels": {"job-name": name},
                             "ownerReferences": owners},
                "spec": {"containers": [{"name": "export", "image": IMAGE}]},
                "status": {"containerStatuses": [{
                    "name": "export", "image": IMAGE, "imageID": "", "ready": false, "restartCount": 0,
                    "state": {"terminated": {"exitCode": 0, "message": report("success", 999),
                              "startedAt": "2099-01-01T00:00:00Z", "finishedAt": "2099-01-01T00:00:01Z"}},
                }]},
            }),
        );
    }
    fake.finish_job(NS, &name, true, &report("success", 42));
    let s = eventually("lastRun in status", || async {
        let s = status(&fake, "nightly");
        (s["lastRun"]["jobName"] == name.as_str()).then_some(s)
    })
    .await;
    assert_eq!(s["lastRun"]["records"], 42, "{s}");
    op.stop().await;
}

/// Specs that would not do what they say are Stalled, with a message naming the field and the fix,
/// and start no run: an image the operator does not allow, plain http to a FHIR server, SMTP
/// credentials without TLS to a remote host, the `true` key a YAML 1.1 parser makes of `on:`, a
/// sub-path leaving its folder, a rate that would wait forever, an output URL naming a folder in the
/// pod, both a volume and a URL, a credentials Secret that does not exist. An allowed image runs, and
/// so does an export to an object store.
#[tokio::test]
async fn specs_that_would_not_do_what_they_say_are_stalled_naming_the_field() {
    let fake = FakeApi::new();
    secret(&fake);
    config_map(&fake);
    fake.put(
        "api/v1/secrets",
        json!({"metadata": {"name": "smtp", "namespace": NS}, "data": {
            "username": base64(smtp::USER), "password": base64(smtp::PASSWORD)}}),
    );
    let email = |extra: Value| {
        let mut email = json!({"host": "smtp.example.org", "from": "exports@example.org",
                               "to": ["team@example.org"]});
        json_merge(&mut email, extra);
        json!({"notify": {"email": email}})
    };
    let cases = [
        (
            "other-image",
            json!({"job": {"image": "evil.example.org/epic-export:1.0"}}),
            "spec.job.image",
            "ImageNotAllowed",
        ),
        (
            "plain-http",
            json!({"fhir": {"baseUrl": "http://fhir.example.org/api/FHIR/R4"}}),
            "spec.fhir.baseUrl",
            "InvalidSpec",
        ),
        (
            "clear-credentials",
            email(json!({"tls": "none", "smtpSecretRef": {"name": "smtp"}})),
            "spec.notify.email.tls",
            "InvalidSpec",
        ),
        (
            "yaml11-on",
            email(json!({"true": ["failure"]})),
            "sendOn",
            "InvalidSpec",
        ),
        (
            "old-on",
            email(json!({"on": ["failure"]})),
            "spec.notify.email.on",
            "InvalidSpec",
        ),
        (
            "outside",
            json!({"output": {"volumeClaimName": "exports", "subPath": "../other-team"}}),
            "spec.output.subPath",
            "InvalidSpec",
        ),
        (
            "too-slow",
            json!({"limits": {"requestsPerSecond": 0.0001}}),
            "spec.limits.requestsPerSecond",
            "InvalidSpec",
        ),
        (
            "pod-folder",
            json!({"output": {"url": "file:///data/exports"}}),
            "spec.output.url",
            "InvalidSpec",
        ),
        (
            "two-outputs",
            json!({"output": {"volumeClaimName": "exports", "url": "s3://phi-exports/epic"}}),
            "spec.output",
            "InvalidSpec",
        ),
        (
            "no-credentials",
            json!({"output": {"url": "s3://phi-exports/epic", "credentialsSecretRef": {"name": "s3-missing"}}}),
            "spec.output.credentialsSecretRef",
            "SecretNotFound",
        ),
    ];
    for (name, spec, _, _) in &cases {
        export(&fake, name, spec.clone(), json!({}));
    }
    export(
        &fake,
        "allowed-image",
        json!({"job": {"image": "registry.example/tools/epic-export:2.0"}}),
        json!({}),
    );
    fake.put(
        "api/v1/secrets",
        json!({"metadata": {"name": "s3-credentials", "namespace": NS}, "data": {
            "AWS_ACCESS_KEY_ID": base64("AKIAEXAMPLE"), "AWS_SECRET_ACCESS_KEY": base64("example")}}),
    );
    export(
        &fake,
        "to-s3",
        json!({"output": {"url": "s3://phi-exports/epic", "credentialsSecretRef": {"name": "s3-credentials"}}}),
        json!({}),
    );
    let mut options = Operator::options(None, None);
    options.settings.images =
        ImagePolicy::new(IMAGE, &["registry.example/tools/*".to_string()]).unwrap();
    let op = Operator::start_with(&fake, options);

    for (name, _, field, reason) in &cases {
        let s = eventually(&format!("{name} Stalled"), || async {
            let s = status(&fake, name);
            (condition(&s, "Stalled")["status"] == "True").then_some(s)
        })
        .await;
        let stalled = condition(&s, "Stalled");
        let message = stalled["message"].as_str().unwrap();
        assert!(message.contains(field), "{name}: {message}");
        assert_eq!(stalled["reason"], *reason, "{name}: {message}");
        assert_eq!(condition(&s, "Ready")["status"], "False");
    }
    let (job, _) = scheduled_run(&fake, "allowed-image").await;
    let job = fake.get(JOBS, NS, &job).unwrap();
    assert_eq!(
        job["spec"]["template"]["spec"]["containers"][0]["image"],
        "registry.example/tools/epic-export:2.0"
    );
    // An object store export runs, with its credentials Secret as the pod's environment.
    let (job, _) = scheduled_run(&fake, "to-s3").await;
    let job = fake.get(JOBS, NS, &job).unwrap();
    let pod = &job["spec"]["template"]["spec"];
    assert_eq!(
        pod["containers"][0]["envFrom"][0]["secretRef"]["name"],
        "s3-credentials"
    );
    assert!(
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "data" && v["emptyDir"]["sizeLimit"] == "2Gi")
    );
    assert_eq!(
        fake.list(JOBS, Some(NS)).len(),
        2,
        "no run for a stalled export"
    );
    op.stop().await;
}

/// The run e-mail over STARTTLS to a server whose certificate (from a private CA) is trusted through
/// `caCertRef` (a ConfigMap key): without the ConfigMap the send fails and says which; with it, sent.
#[tokio::test]
async fn the_run_email_trusts_the_certificate_in_the_ca_config_map() {
    let server = smtp::smtp_server("starttls").await;
    let fake = FakeApi::new();
    secret(&fake);
    config_map(&fake);
    fake.put(
        "api/v1/secrets",
        json!({"metadata": {"name": "smtp", "namespace": NS}, "data": {
            "username": base64(smtp::USER), "password": base64(smtp::PASSWORD)}}),
    );
    export(
        &fake,
        "nightly",
        json!({"notify": {"email": {
            "host": "127.0.0.1", "port": server.port, "tls": "starttls",
            "from": "exports@example.org", "to": ["team@example.org"], "sendOn": ["success"],
            "smtpSecretRef": {"name": "smtp"},
            "caCertRef": {"configMapName": "smtp-ca", "key": "ca.pem"}}}}),
        json!({}),
    );
    let op = Operator::start(&fake, None, None);
    let (name, _) = scheduled_run(&fake, "nightly").await;
    fake.finish_job(NS, &name, true, &report("success", 7));
    let s = eventually("the failed e-mail recorded", || async {
        let s = status(&fake, "nightly");
        s["lastRun"]["notification"].as_str().is_some().then_some(s)
    })
    .await;
    assert_eq!(
        s["lastRun"]["notification"],
        "failed: ConfigMap \"smtp-ca\" (spec.notify.email.caCertRef) does not exist"
    );

    let pem = std::fs::read_to_string(smtp::fixtures().join("ca.pem")).unwrap();
    fake.put(
        "api/v1/configmaps",
        json!({"metadata": {"name": "smtp-ca", "namespace": NS}, "data": {"ca.pem": pem}}),
    );
    let mut obj = fake.get(EXPORTS, NS, "nightly").unwrap();
    obj["metadata"]["annotations"] = json!({"fhirexport.dev/run-now": "again"});
    fake.put(EXPORTS, obj);
    let again = on_demand_job_name("nightly", "again");
    eventually("the second run", || async { fake.get(JOBS, NS, &again) }).await;
    fake.finish_job(NS, &again, true, &report("success", 8));
    let s = eventually("the e-mail sent", || async {
        let s = status(&fake, "nightly");
        (s["lastRun"]["jobName"] == again.as_str() && s["lastRun"]["notification"].is_string())
            .then_some(s)
    })
    .await;
    assert_eq!(s["lastRun"]["notification"], "sent to 1 recipient", "{s}");
    let mail: Value = serde_json::from_str(
        &std::fs::read_to_string(server.maildir.path().join("1.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        mail["subject"],
        "[epic-export] nightly: success — 8 records"
    );
    op.stop().await;
}
