//! The real controller end to end against the in-process fake API server (`support/fake_api.rs`):
//! runs start as Jobs with the right name, mounts and security; finished Jobs land in status, Events
//! and metrics; a restarted operator adopts instead of duplicating; a missing Secret stalls until it
//! is created; history is cleaned up; an idle operator writes nothing; leader election lets one of
//! two replicas act.

#[path = "support/fake_api.rs"]
mod fake_api;
#[path = "support/smtp.rs"]
mod smtp;

use std::future::Future;
use std::time::Duration;

use epic_export::operator::controller::Settings;
use epic_export::operator::controller::decide::on_demand_job_name;
use epic_export::operator::job::RunReportMessage;
use epic_export::operator::lease::LeaseSettings;
use epic_export::operator::{ControllerOptions, serve_controller};
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

fn secret(fake: &FakeApi) {
    fake.put(
        "api/v1/secrets",
        json!({"metadata": {"name": "epic-key", "namespace": NS}, "data": {"private.pem": "LS0tLS1CRUdJTi0tLS0t"}}),
    );
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
    done: tokio::task::JoinHandle<anyhow::Result<u8>>,
}

impl Operator {
    fn start(
        fake: &FakeApi,
        lease: Option<LeaseSettings>,
        http: Option<std::net::SocketAddr>,
    ) -> Operator {
        let (tx, rx) = oneshot::channel();
        let options = ControllerOptions {
            settings: Settings {
                image: IMAGE.into(),
                namespace: None,
                identity: lease
                    .as_ref()
                    .map(|l| l.identity.clone())
                    .unwrap_or("op-0".into()),
                rotation: Default::default(),
            },
            http_addr: http,
            leader_election: lease,
            jwks: None,
        };
        let done = tokio::spawn(serve_controller(fake.client(), options, async {
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

async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
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

#[tokio::test]
async fn a_due_run_becomes_a_job_and_its_report_lands_in_status_events_and_metrics() {
    let fake = FakeApi::new();
    secret(&fake);
    config_map(&fake);
    export(&fake, "nightly", json!({}), json!({}));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let op = Operator::start(&fake, None, Some(port));

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
        !job.to_string().contains("LS0tLS1CRUdJTi0tLS0t"),
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

    // Steady state: an idle operator writes nothing (no hot loop on its own status writes).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mark = fake.requests().len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let writes = fake.writes_since(mark);
    assert!(writes.is_empty(), "idle writes: {writes:?}");
    let reads = fake.requests().len() - mark;
    assert!(reads < 10, "idle reads: {reads}");
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
    let op = Operator::start(&fake, None, None);

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

    // Waiting, not retrying: no writes while nothing changes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mark = fake.requests().len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(fake.writes_since(mark).is_empty());
    assert_eq!(
        event_reasons(&fake, "nightly")
            .iter()
            .filter(|r| *r == "SecretNotFound")
            .count(),
        1,
        "one Warning Event"
    );

    // Creating the Secret re-triggers the export.
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
    tokio::time::sleep(Duration::from_secs(1)).await;
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
    let op = Operator::start(&fake, None, None);
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
    eventually("the second e-mail", || async {
        mail(2).exists().then_some(())
    })
    .await;
    let second: Value = serde_json::from_str(&std::fs::read_to_string(mail(2)).unwrap()).unwrap();
    assert_eq!(
        second["subject"],
        "[epic-export] nightly: failed — 0 records"
    );
    // Steady state: no third message.
    tokio::time::sleep(Duration::from_secs(2)).await;
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
