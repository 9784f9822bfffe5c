//! The controller's pure steps: `validate`, `decide` and `status`, with an injected clock.

use epic_export::operator::controller::decide::{
    RUN_NOW_ANNOTATION, decide, history_to_prune, on_demand_job_name,
};
use epic_export::operator::controller::model::{
    FinishedReport, Observed, RefCheck, RefKind, Reference, Run, RunState, SpecError, Trigger,
    Validated,
};
use epic_export::operator::controller::status::{
    StatusInput, finished_run_note, next_status, spec_error_note,
};
use epic_export::operator::crd::EpicExport;
use epic_export::operator::images::ImagePolicy;
use epic_export::operator::job::RunReportMessage;
use epic_export::schedule::job_name;
use jiff::Timestamp;

const SPEC: &str = "  schedule: \"0 2 * * *\"
  fhir:
    baseUrl: https://fhir.example.org/api/FHIR/R4
  auth:
    clientId: abc
    keySecretRef: {name: epic-key, key: private.pem}
  source:
    search:
      rosterRef: {configMapName: roster, key: roster.csv}
      resources:
        - type: Patient
  output:
    volumeClaimName: exports
";

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

/// An EpicExport created at 2026-11-27T01:30Z, with `extra` spec lines and `meta` metadata lines.
fn export_with(extra: &str, meta: &str) -> EpicExport {
    let doc = format!(
        "apiVersion: fhirexport.dev/v1alpha1\nkind: EpicExport\nmetadata:\n  name: nightly\n  namespace: phi\n  uid: u-1\n  generation: 2\n  creationTimestamp: \"2026-11-27T01:30:00Z\"\n{meta}spec:\n{SPEC}{extra}"
    );
    serde_saphyr::from_str(&doc).unwrap_or_else(|e| panic!("{e}\n{doc}"))
}

fn export(extra: &str) -> EpicExport {
    export_with(extra, "")
}

fn present() -> Observed {
    Observed {
        references: vec![
            Reference {
                field: "spec.auth.keySecretRef",
                kind: RefKind::Secret,
                name: "epic-key".into(),
                key: "private.pem".into(),
                check: RefCheck::Present,
            },
            Reference {
                field: "spec.source.search.rosterRef",
                kind: RefKind::ConfigMap,
                name: "roster".into(),
                key: "roster.csv".into(),
                check: RefCheck::Present,
            },
        ],
        ..Observed::default()
    }
}

/// The validate step of an operator whose job image is `registry.example/epic-export:1.0`.
fn validate(e: &EpicExport, observed: &Observed) -> Result<Validated, SpecError> {
    epic_export::operator::controller::validate::validate(
        e,
        observed,
        &ImagePolicy::only("registry.example/epic-export:1.0"),
    )
}

fn valid(e: &EpicExport) -> Validated {
    validate(e, &present()).expect("valid")
}

fn run(name: &str, state: RunState, started: &str) -> Run {
    let started = ts(started);
    Run {
        name: name.into(),
        uid: None,
        state,
        scheduled_at: None,
        created: Some(started),
        started: Some(started),
        finished: (state != RunState::Active)
            .then(|| started + jiff::SignedDuration::from_mins(10)),
        failure: (state == RunState::Failed)
            .then(|| "BackoffLimitExceeded: Job has reached the specified backoff limit".into()),
    }
}

#[test]
fn validation_names_the_field_and_the_fix() {
    let bad_cron = validate(&export("").tap_schedule("0 25 * * *"), &present()).unwrap_err();
    assert_eq!(bad_cron.field, "spec.schedule");
    assert_eq!(bad_cron.reason, "InvalidSchedule");

    let bad_zone = validate(&export("  timeZone: Mars/Olympus\n"), &present()).unwrap_err();
    assert_eq!(bad_zone.field, "spec.timeZone");
    assert!(bad_zone.message.contains("Mars/Olympus"), "{bad_zone}");

    let mut missing = present();
    missing.references[0].check = RefCheck::Missing;
    let e = validate(&export(""), &missing).unwrap_err();
    assert_eq!(
        (e.reason, e.field.as_str()),
        ("SecretNotFound", "spec.auth.keySecretRef")
    );
    assert!(
        e.message.contains("\"epic-key\"") && e.message.contains("create it"),
        "{e}"
    );

    let mut no_key = present();
    no_key.references[1].check = RefCheck::KeyMissing {
        keys: vec!["patients.csv".into()],
    };
    let e = validate(&export(""), &no_key).unwrap_err();
    assert_eq!(
        (e.reason, e.field.as_str()),
        ("KeyNotFound", "spec.source.search.rosterRef")
    );
    assert!(
        e.message.contains("roster.csv") && e.message.contains("patients.csv"),
        "{e}"
    );

    // What the CRD schema cannot see goes through the standalone config validation.
    let e = validate(&export("").tap_source_resources("Observation"), &present()).unwrap_err();
    assert!(e.field.starts_with("spec.source.search"), "{e}");
    assert!(
        e.message.contains("category") || e.message.contains("code"),
        "{e}"
    );

    let e = validate(&export("  limits: {concurrency: 0}\n"), &present()).unwrap_err();
    assert_eq!(e.field, "spec.limits.concurrency", "{e}");

    // Key rotation: a fixed keyId cannot rotate, and `every` needs a unit and at least an hour.
    let mut rotating = export("");
    rotating.spec.auth.rotation = Some(Default::default());
    rotating.spec.auth.key_id = Some("key-1".into());
    let e = validate(&rotating, &present()).unwrap_err();
    assert_eq!(e.field, "spec.auth.keyId", "{e}");
    assert!(e.message.contains("remove keyId"), "{e}");
    rotating.spec.auth.key_id = None;
    for (every, ok) in [("90d", true), ("90", false), ("10m", false)] {
        rotating.spec.auth.rotation.as_mut().unwrap().every = Some(every.into());
        match validate(&rotating, &present()) {
            Ok(v) => assert!(ok && v.rotate_every.is_some(), "{every} accepted"),
            Err(e) => {
                assert!(!ok, "{every}: {e}");
                assert_eq!(e.field, "spec.auth.rotation.every");
            }
        }
    }
    let mut bad_key = present();
    bad_key.references[0].check = RefCheck::Invalid {
        reason: "\"next-private.pem\" is not a usable private key: not a PEM file".into(),
    };
    let e = validate(&export(""), &bad_key).unwrap_err();
    assert_eq!(
        (e.reason, e.field.as_str()),
        ("InvalidKey", "spec.auth.keySecretRef")
    );
    assert!(
        e.message.contains("next-private.pem") && e.message.contains("keygen"),
        "{e}"
    );
}

/// Each field a careless author can get silently wrong is an error naming it (for objects the CRD's
/// own rules did not check, e.g. admitted under an older CRD), and its neighbours still pass.
#[test]
fn mistakes_the_schema_may_miss_are_errors_naming_the_field() {
    let email = |lines: &str| {
        format!(
            "  notify:\n    email:\n      host: smtp.example.org\n      from: a@example.org\n      to: [b@example.org]\n{lines}"
        )
    };
    let cases: Vec<(String, Option<&str>)> = vec![
        (
            "  job: {image: evil.example.org/x:1}\n".into(),
            Some("spec.job.image"),
        ),
        (
            "  job: {image: registry.example/epic-export:1.0}\n".into(),
            None,
        ),
        (
            "  job: {backoffLimit: -1}\n".into(),
            Some("spec.job.backoffLimit"),
        ),
        (
            "  job: {backoffLimit: 0, activeDeadlineSeconds: 1}\n".into(),
            None,
        ),
        (
            "  job: {activeDeadlineSeconds: 0}\n".into(),
            Some("spec.job.activeDeadlineSeconds"),
        ),
        (
            "  limits: {requestsPerSecond: 0.001}\n".into(),
            Some("spec.limits.requestsPerSecond"),
        ),
        (
            "  limits: {requestsPerSecond: 1001}\n".into(),
            Some("spec.limits.requestsPerSecond"),
        ),
        (
            "  limits: {requestsPerSecond: .nan}\n".into(),
            Some("spec.limits.requestsPerSecond"),
        ),
        ("  limits: {requestsPerSecond: 0}\n".into(), None),
        ("  limits: {requestsPerSecond: 0.01}\n".into(), None),
        (
            email("      \"on\": [failure]\n"),
            Some("spec.notify.email.on"),
        ),
        (
            email("      \"true\": [failure]\n"),
            Some("spec.notify.email"),
        ),
        (email("      sendOn: [failure]\n"), None),
        (
            email("      sendOn: [failures]\n"),
            Some("spec.notify.email.sendOn"),
        ),
        (email("      port: 0\n"), Some("spec.notify.email.port")),
        (
            email("      tls: none\n      smtpSecretRef: {name: smtp}\n"),
            Some("spec.notify.email.tls"),
        ),
        (email("      tls: none\n"), None),
        (
            email("      tls: starttls\n      smtpSecretRef: {name: smtp}\n"),
            None,
        ),
        (email("      tls: plain\n"), Some("spec.notify.email.tls")),
        (
            email("      caCertRef: {configMapName: \"Bad/Name\", key: ca.pem}\n"),
            Some("spec.notify.email.caCertRef"),
        ),
        (
            email("      caCertRef: {configMapName: smtp-ca, key: ca.pem}\n"),
            None,
        ),
    ];
    for (extra, field) in &cases {
        match (validate(&export(extra), &present()), field) {
            (Ok(_), None) => {}
            (Err(e), Some(field)) => {
                assert_eq!(e.field, *field, "{extra}: {e}");
                assert!(
                    !e.is_in_reference(),
                    "{extra}: a spec mistake waits for a change"
                );
            }
            (Ok(_), Some(field)) => panic!("{extra}: accepted, expected an error at {field}"),
            (Err(e), None) => panic!("{extra}: refused: {e}"),
        }
    }
    // Fields of the base spec.
    for (sub_path, ok) in [
        ("/etc", false),
        ("a/../../b", false),
        ("..", false),
        ("a/..b/c", true),
    ] {
        let mut e = export("");
        e.spec.output.sub_path = Some(sub_path.into());
        match validate(&e, &present()) {
            Ok(_) => assert!(ok, "{sub_path} accepted"),
            Err(err) => {
                assert!(!ok, "{sub_path}: {err}");
                assert_eq!(err.field, "spec.output.subPath");
            }
        }
    }
    let mut plain = export("");
    plain.spec.fhir.base_url = "http://fhir.example.org/R4".into();
    let e = validate(&plain, &present()).unwrap_err();
    assert_eq!(e.field, "spec.fhir.baseUrl", "{e}");
    assert!(e.message.contains("allowInsecureHttp"), "{e}");
    plain.spec.fhir.allow_insecure_http = Some(true);
    validate(&plain, &present()).expect("plain http when allowed");
    // Credentials in clear text only to loopback.
    let loopback = "  notify:\n    email:\n      host: \"::1\"\n      tls: none\n      from: a@example.org\n      to: [b@example.org]\n      smtpSecretRef: {name: smtp}\n";
    validate(&export(loopback), &present()).expect("loopback may be plain text");
    // Bulk: the standalone config's checks apply (maxWaitHours, origins).
    let bulk = |lines: &str| {
        let mut e = export("");
        let doc = format!("level: system\n{lines}");
        e.spec.source.search = None;
        e.spec.source.bulk = Some(serde_saphyr::from_str(&doc).unwrap());
        e
    };
    for (lines, field) in [
        ("maxWaitHours: 0\n", "spec.source.bulk.maxWaitHours"),
        ("maxWaitHours: 9000\n", "spec.source.bulk.maxWaitHours"),
        (
            "fileHosts: [\"https://storage.example.org/path\"]\n",
            "spec.source.bulk.fileHosts[0]",
        ),
        (
            "tokenHosts: [\"http://storage.example.org\"]\n",
            "spec.source.bulk.tokenHosts[0]",
        ),
    ] {
        let e = validate(&bulk(lines), &present()).unwrap_err();
        assert_eq!(e.field, field, "{lines}: {e}");
    }
    validate(
        &bulk("maxWaitHours: 8760\nfileHosts: [\"https://storage.example.org\"]\n"),
        &present(),
    )
    .expect("valid bulk settings");
    // A rotation interval that would overflow time arithmetic is refused, not a panic later.
    let mut rotating = export("");
    for every in ["99999999999999999999d", "9223372036854775807w", "5300000w"] {
        rotating.spec.auth.rotation = Some(Default::default());
        rotating.spec.auth.rotation.as_mut().unwrap().every = Some(every.into());
        let e = validate(&rotating, &present()).unwrap_err();
        assert_eq!(e.field, "spec.auth.rotation.every", "{every}");
        assert!(e.message.contains("too long"), "{every}: {e}");
    }
    // A name that cannot be an object's is not looked up, and is an error naming the field.
    let mut bad_name = present();
    bad_name.references[1].check = RefCheck::BadName {
        reason: "\"Roster/x\" is not an object name".into(),
    };
    let e = validate(&export(""), &bad_name).unwrap_err();
    assert_eq!(
        (e.reason, e.field.as_str()),
        ("InvalidSpec", "spec.source.search.rosterRef")
    );
    assert!(!e.is_in_reference());
    let mut missing = present();
    missing.references[1].check = RefCheck::Missing;
    assert!(
        validate(&export(""), &missing)
            .unwrap_err()
            .is_in_reference()
    );
}

trait Tweak {
    fn tap_schedule(self, cron: &str) -> Self;
    fn tap_source_resources(self, ty: &str) -> Self;
}

impl Tweak for EpicExport {
    fn tap_schedule(mut self, cron: &str) -> Self {
        self.spec.schedule = cron.into();
        self
    }
    fn tap_source_resources(mut self, ty: &str) -> Self {
        let search = self.spec.source.search.as_mut().unwrap();
        search.resources.as_mut().unwrap()[0].resource_type = ty.into();
        self
    }
}

#[test]
fn the_first_due_slot_starts_one_run_with_a_deterministic_name() {
    let e = export("");
    let now = ts("2026-11-27T02:00:30Z");
    let plan = decide(&e, &valid(&e), &[], now);
    let start = plan.start.expect("a run starts");
    assert_eq!(
        start.job_name,
        job_name("nightly", ts("2026-11-27T02:00:00Z"))
    );
    assert_eq!(start.trigger, Trigger::Schedule);
    assert_eq!(plan.record_schedule, Some(ts("2026-11-27T02:00:00Z")));
    assert_eq!(plan.requeue_at, Some(ts("2026-11-28T02:00:00.1Z")));

    // Before the slot: nothing, look again at 02:00:00.1.
    let plan = decide(&e, &valid(&e), &[], ts("2026-11-27T01:59:00Z"));
    assert_eq!(plan.start, None);
    assert_eq!(plan.requeue_at, Some(ts("2026-11-27T02:00:00.1Z")));
}

#[test]
fn an_existing_job_for_the_slot_is_adopted_not_duplicated() {
    let e = export("");
    let name = job_name("nightly", ts("2026-11-27T02:00:00Z"));
    let runs = [run(&name, RunState::Active, "2026-11-27T02:00:01Z")];
    let plan = decide(&e, &valid(&e), &runs, ts("2026-11-27T02:00:30Z"));
    assert_eq!(plan.start, None, "no second Job");
    assert_eq!(
        plan.record_schedule,
        Some(ts("2026-11-27T02:00:00Z")),
        "the slot is recorded"
    );
}

#[test]
fn concurrency_policies() {
    let now = ts("2026-11-28T02:00:30Z");
    let mut e = export("");
    e.status = Some(epic_export::operator::crd::EpicExportStatus {
        last_schedule_time: Some("2026-11-27T02:00:00Z".into()),
        ..Default::default()
    });
    let active = [run(
        "nightly-29400000",
        RunState::Active,
        "2026-11-27T02:00:00Z",
    )];

    let plan = decide(&e, &valid(&e), &active, now);
    assert_eq!(plan.start, None, "Forbid (the default) waits");
    assert_eq!(plan.record_schedule, None, "the slot stays due");
    assert_eq!(plan.notes[0].reason, "JobAlreadyActive");

    e.spec.concurrency_policy = epic_export::schedule::ConcurrencyPolicy::Replace;
    let plan = decide(&e, &valid(&e), &active, now);
    assert!(plan.start.is_some());
    assert_eq!(plan.stop, vec!["nightly-29400000".to_string()]);

    e.spec.concurrency_policy = epic_export::schedule::ConcurrencyPolicy::Allow;
    let plan = decide(&e, &valid(&e), &active, now);
    assert!(plan.start.is_some());
    assert!(plan.stop.is_empty());
}

#[test]
fn suspend_and_starting_deadline() {
    let e = export("  suspend: true\n");
    let plan = decide(&e, &valid(&e), &[], ts("2026-11-27T02:00:30Z"));
    assert_eq!((plan.start, plan.requeue_at), (None, None));

    // The operator was down at 02:00 and comes back at 02:10; the deadline is 5 minutes.
    let e = export("  startingDeadlineSeconds: 300\n");
    let plan = decide(&e, &valid(&e), &[], ts("2026-11-27T02:10:00Z"));
    assert_eq!(plan.start, None);
    assert_eq!(plan.notes[0].reason, "MissSchedule");
    // Within the deadline it still starts (late).
    let plan = decide(&e, &valid(&e), &[], ts("2026-11-27T02:04:00Z"));
    assert!(plan.start.is_some());
}

#[test]
fn only_the_most_recent_missed_run_starts_after_an_outage() {
    let mut e = export("");
    e.status = Some(epic_export::operator::crd::EpicExportStatus {
        last_schedule_time: Some("2026-11-20T02:00:00Z".into()),
        ..Default::default()
    });
    let plan = decide(&e, &valid(&e), &[], ts("2026-11-27T09:00:00Z"));
    let start = plan.start.unwrap();
    assert_eq!(
        start.scheduled,
        ts("2026-11-27T02:00:00Z"),
        "not a backlog of 7"
    );
}

#[test]
fn run_now_starts_one_run_per_new_value() {
    let meta = format!("  annotations:\n    {RUN_NOW_ANNOTATION}: \"2026-11-27-a\"\n");
    let mut e = export_with("", &meta);
    e.status = Some(epic_export::operator::crd::EpicExportStatus {
        last_schedule_time: Some("2026-11-27T02:00:00Z".into()),
        ..Default::default()
    });
    let now = ts("2026-11-27T10:00:00Z");
    let plan = decide(&e, &valid(&e), &[], now);
    let start = plan.start.expect("starts now");
    assert_eq!(
        start.job_name,
        on_demand_job_name("nightly", "2026-11-27-a")
    );
    assert!(start.job_name.len() <= 63);
    assert_eq!(start.trigger, Trigger::OnDemand("2026-11-27-a".into()));

    // Once handled (recorded in status), the same value does nothing.
    let mut handled = e.clone();
    handled.status = Some(epic_export::operator::crd::EpicExportStatus {
        run_now_handled: Some("2026-11-27-a".into()),
        last_schedule_time: Some("2026-11-27T02:00:00Z".into()),
        ..Default::default()
    });
    assert_eq!(decide(&handled, &valid(&handled), &[], now).start, None);

    // The Job exists already (status write lost): adopt, record, no second run.
    let runs = [run(
        &start.job_name,
        RunState::Active,
        "2026-11-27T10:00:00Z",
    )];
    let plan = decide(&e, &valid(&e), &runs, now);
    assert_eq!(plan.start, None);
    assert_eq!(plan.run_now_handled.as_deref(), Some("2026-11-27-a"));

    // Forbid and another run active: it waits.
    let runs = [run(
        "nightly-29400000",
        RunState::Active,
        "2026-11-27T09:00:00Z",
    )];
    let plan = decide(&e, &valid(&e), &runs, now);
    assert_eq!(plan.start, None);
    assert!(plan.notes.iter().any(|n| n.reason == "JobAlreadyActive"));
    assert_eq!(plan.run_now_handled, None, "still pending");

    // A 52-character export name still gives a valid Job name.
    let long = "a".repeat(52);
    assert_eq!(on_demand_job_name(&long, "x").len(), 62);
}

#[test]
fn history_keeps_the_newest_runs_per_outcome() {
    let runs = [
        run("n-1", RunState::Succeeded, "2026-11-21T02:00:00Z"),
        run("n-2", RunState::Succeeded, "2026-11-22T02:00:00Z"),
        run("n-3", RunState::Failed, "2026-11-23T02:00:00Z"),
        run("n-4", RunState::Succeeded, "2026-11-24T02:00:00Z"),
        run("n-5", RunState::Failed, "2026-11-25T02:00:00Z"),
        run("n-6", RunState::Succeeded, "2026-11-26T02:00:00Z"),
        run("n-7", RunState::Active, "2026-11-27T02:00:00Z"),
    ];
    assert_eq!(history_to_prune(&runs, 3, 1), vec!["n-1", "n-3"]);
    assert_eq!(
        history_to_prune(&runs, 0, 0),
        vec!["n-1", "n-2", "n-3", "n-4", "n-5", "n-6"]
    );
    assert!(history_to_prune(&runs, 10, 10).is_empty());
}

fn report(job: &str, outcome: &str) -> FinishedReport {
    FinishedReport {
        job: job.into(),
        message: Some(RunReportMessage {
            outcome: outcome.into(),
            records: 120,
            bytes: 4096,
            records_by_type: [
                ("Patient".to_string(), 20u64),
                ("Observation".to_string(), 100),
            ]
            .into(),
            output_dir: "/data/nightly/20261127T020000Z".into(),
            transaction_time: Some("2026-11-27T02:00:05Z".into()),
            ..RunReportMessage::default()
        }),
    }
}

#[test]
fn status_records_the_finished_run_and_is_stable() {
    let e = export("");
    let now = ts("2026-11-27T02:20:00Z");
    let runs = [run(
        "nightly-29400000",
        RunState::Succeeded,
        "2026-11-27T02:00:00Z",
    )];
    let rep = report("nightly-29400000", "success");
    let input = StatusInput {
        export: &e,
        runs: &runs,
        spec_error: None,
        plan: None,
        next: Some(ts("2026-11-28T02:00:00Z")),
        report: Some(&rep),
        public_keys: None,
        now,
    };
    let s = next_status(&input);
    let last = s.last_run.clone().unwrap();
    assert_eq!(
        (last.outcome.as_str(), last.records, last.bytes),
        ("success", 120, 4096)
    );
    assert_eq!(last.records_by_type["Observation"], 100);
    assert_eq!(last.finished_at.as_deref(), Some("2026-11-27T02:10:00Z"));
    assert_eq!(
        s.last_successful_time.as_deref(),
        Some("2026-11-27T02:10:00Z")
    );
    assert_eq!(
        s.last_transaction_time.as_deref(),
        Some("2026-11-27T02:00:05Z")
    );
    assert_eq!(
        s.next_schedule_time.as_deref(),
        Some("2026-11-28T02:00:00Z")
    );
    assert_eq!(s.observed_generation, Some(2));
    let cond = |s: &epic_export::operator::crd::EpicExportStatus, t: &str| {
        s.conditions.iter().find(|c| c.type_ == t).cloned().unwrap()
    };
    assert_eq!(cond(&s, "Ready").status, "True");
    assert_eq!(cond(&s, "Stalled").status, "False");
    assert_eq!(cond(&s, "Running").status, "False");
    let note = finished_run_note(&Default::default(), &s).unwrap();
    assert_eq!((note.reason, note.warning), ("RunSucceeded", false));

    // The same world an hour later: the same status (no write, no Event).
    let mut again = e.clone();
    again.status = Some(s.clone());
    let later = StatusInput {
        export: &again,
        now: ts("2026-11-27T03:20:00Z"),
        ..input
    };
    assert_eq!(next_status(&later), s);
    assert_eq!(finished_run_note(&s, &next_status(&later)), None);

    // A run starts: Running flips and only its lastTransitionTime moves.
    let mut runs2 = runs.to_vec();
    runs2.push(run(
        "nightly-29401440",
        RunState::Active,
        "2026-11-28T02:00:00Z",
    ));
    let started = next_status(&StatusInput {
        runs: &runs2,
        now: ts("2026-11-28T02:00:01Z"),
        ..later
    });
    assert_eq!(cond(&started, "Running").status, "True");
    assert_eq!(
        cond(&started, "Running").last_transition_time.0,
        ts("2026-11-28T02:00:01Z")
    );
    assert_eq!(
        cond(&started, "Ready").last_transition_time,
        cond(&s, "Ready").last_transition_time
    );
    assert_eq!(started.active, vec!["nightly-29401440".to_string()]);
}

#[test]
fn a_failed_run_without_a_report_says_why() {
    let e = export("");
    let runs = [run(
        "nightly-29400000",
        RunState::Failed,
        "2026-11-27T02:00:00Z",
    )];
    let rep = FinishedReport {
        job: "nightly-29400000".into(),
        message: None,
    };
    let s = next_status(&StatusInput {
        export: &e,
        runs: &runs,
        spec_error: None,
        plan: None,
        next: None,
        report: Some(&rep),
        public_keys: None,
        now: ts("2026-11-27T03:00:00Z"),
    });
    let last = s.last_run.clone().unwrap();
    assert_eq!(last.outcome, "failed");
    assert!(
        last.errors[0].contains("BackoffLimitExceeded"),
        "{:?}",
        last.errors
    );
    assert_eq!(s.last_successful_time, None);
    let note = finished_run_note(&Default::default(), &s).unwrap();
    assert_eq!((note.reason, note.warning), ("RunFailed", true));

    // A partial run is a warning too, and does not move since/lastSuccessfulTime.
    let rep = report("nightly-29400000", "partial");
    let s = next_status(&StatusInput {
        export: &e,
        runs: &runs,
        spec_error: None,
        plan: None,
        next: None,
        report: Some(&rep),
        public_keys: None,
        now: ts("2026-11-27T03:00:00Z"),
    });
    assert_eq!(s.last_transaction_time, None);
    assert_eq!(
        finished_run_note(&Default::default(), &s).unwrap().reason,
        "RunPartial"
    );
}

#[test]
fn a_spec_error_stalls_once() {
    let e = export("");
    let mut missing = present();
    missing.references[0].check = RefCheck::Missing;
    let error = validate(&e, &missing).unwrap_err();
    let s = next_status(&StatusInput {
        export: &e,
        runs: &[],
        spec_error: Some(&error),
        plan: None,
        next: None,
        report: None,
        public_keys: None,
        now: ts("2026-11-27T03:00:00Z"),
    });
    let stalled = s.conditions.iter().find(|c| c.type_ == "Stalled").unwrap();
    assert_eq!(
        (stalled.status.as_str(), stalled.reason.as_str()),
        ("True", "SecretNotFound")
    );
    assert!(stalled.message.contains("spec.auth.keySecretRef"));
    let ready = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(ready.status, "False");
    assert_eq!(s.next_schedule_time, None);
    // One Warning Event for it, not one per pass.
    assert!(spec_error_note(&Default::default(), &error).is_some());
    assert!(spec_error_note(&s, &error).is_none());
}

/// The export with `spec.output` replaced by `yaml` (flow or block YAML of an OutputSpec).
fn with_output(yaml: &str) -> EpicExport {
    let mut e = export("");
    e.spec.output = serde_saphyr::from_str(yaml).unwrap_or_else(|err| panic!("{yaml}: {err}"));
    e
}

/// `spec.output` is a volume or an object store, never both or neither, and an object store URL is
/// parsed the way the pod will parse it: every mistake is an error naming the field (for objects the
/// CRD's rules did not check), and good settings pass.
#[test]
fn output_is_a_volume_or_an_object_store_and_its_mistakes_name_the_field() {
    let cases: &[(&str, Option<(&str, &str)>)] = &[
        (
            "{volumeClaimName: exports, url: \"s3://phi-exports/epic\"}",
            Some(("spec.output", "not both")),
        ),
        ("{keepRuns: 3}", Some(("spec.output", "volumeClaimName"))),
        (
            "{url: \"file:///data/exports\"}",
            Some(("spec.output.url", "use volumeClaimName")),
        ),
        (
            "{url: /data/exports}",
            Some(("spec.output.url", "use volumeClaimName")),
        ),
        (
            "{url: \"file:///data/exports\", region: us-east-1}",
            Some(("spec.output.url", "use volumeClaimName")),
        ),
        (
            "{url: \"ftp://phi-exports/epic\"}",
            Some((
                "spec.output.url",
                "write s3://bucket/prefix, az://container/prefix or gs://bucket/prefix",
            )),
        ),
        (
            "{url: \"s3://phi exports/epic\"}",
            Some(("spec.output.url", "not an object store URL")),
        ),
        (
            "{url: \"s3://Bad_Bucket/epic\"}",
            Some(("spec.output.url", "Bad_Bucket")),
        ),
        (
            "{url: \"s3://phi-exports/a/../b\"}",
            Some(("spec.output.url", "prefix")),
        ),
        (
            "{url: \"s3://phi-exports/epic?versionId=1\"}",
            Some(("spec.output.url", "query")),
        ),
        (
            "{url: \"s3://phi-exports/epic\", endpoint: \"http://minio.example.org\"}",
            Some(("spec.output.endpoint", "https")),
        ),
        (
            "{url: \"s3://phi-exports/epic\", endpoint: \"https://minio.example.org/path\"}",
            Some(("spec.output.endpoint", "without a path")),
        ),
        (
            "{url: \"s3://phi-exports/epic\", subPath: nightly}",
            Some(("spec.output.subPath", "prefix")),
        ),
        (
            "{url: \"s3://phi-exports/epic\", compression: zip}",
            Some(("spec.output.compression", "gzip")),
        ),
        (
            "{url: \"s3://phi-exports/epic\", partSize: 1024}",
            Some(("spec.output.partSize", "5 MiB")),
        ),
        (
            "{url: \"s3://phi-exports/epic\", uploadConcurrency: 0}",
            Some(("spec.output.uploadConcurrency", "1 to 64")),
        ),
        (
            "{url: \"s3://phi-exports/epic\", scratchSizeLimit: lots}",
            Some(("spec.output.scratchSizeLimit", "2Gi")),
        ),
        (
            "{volumeClaimName: exports, endpoint: \"https://minio.example.org\"}",
            Some(("spec.output.endpoint", "spec.output.url")),
        ),
        (
            "{volumeClaimName: exports, credentialsSecretRef: {name: s3-credentials}}",
            Some(("spec.output.credentialsSecretRef", "spec.output.url")),
        ),
        (
            "{volumeClaimName: \"\"}",
            Some(("spec.output.volumeClaimName", "PersistentVolumeClaim")),
        ),
        // What must pass.
        ("{volumeClaimName: exports, compression: gzip}", None),
        (
            "{url: \"s3://phi-exports/epic\", endpoint: \"https://minio.example.org\", region: us-east-1, compression: gzip, partSize: 16777216, uploadConcurrency: 8, credentialsSecretRef: {name: s3-credentials}, scratchSizeLimit: 4Gi, keepRuns: 60}",
            None,
        ),
        ("{url: \"az://exports/epic\"}", None),
        ("{url: \"gs://phi-exports\"}", None),
        (
            "{url: \"s3://phi-exports/epic\", endpoint: \"http://127.0.0.1:9000\"}",
            None,
        ),
    ];
    for (output, expected) in cases {
        let result = validate(&with_output(output), &present());
        match (result, expected) {
            (Ok(_), None) => {}
            (Err(e), Some((field, words))) => {
                assert_eq!(e.field, *field, "{output}: {e}");
                assert!(e.message.contains(words), "{output}: {e}");
                assert_eq!(e.reason, "InvalidSpec", "{output}: {e}");
                assert!(!e.is_in_reference(), "{output}: waits for a change");
            }
            (Ok(_), Some((field, _))) => panic!("{output}: accepted, expected an error at {field}"),
            (Err(e), None) => panic!("{output}: refused: {e}"),
        }
    }
    // Credentials written into the URL are refused, and not repeated in the status.
    let e = validate(
        &with_output("{url: \"s3://AKIAEXAMPLE:s3cr3t@phi-exports/epic\"}"),
        &present(),
    )
    .unwrap_err();
    assert_eq!(e.field, "spec.output.url");
    assert!(!e.to_string().contains("s3cr3t"), "{e}");
}

#[test]
fn the_credentials_secret_must_exist_and_hold_the_clients_variables() {
    let e = with_output(
        "{url: \"s3://phi-exports/epic\", credentialsSecretRef: {name: s3-credentials}}",
    );
    let with = |check: RefCheck| {
        let mut observed = present();
        observed.references.push(Reference {
            field: "spec.output.credentialsSecretRef",
            kind: RefKind::Secret,
            name: "s3-credentials".into(),
            key: String::new(),
            check,
        });
        observed
    };
    valid_with(&e, &with(RefCheck::Present));
    let missing = validate(&e, &with(RefCheck::Missing)).unwrap_err();
    assert_eq!(
        (missing.reason, missing.field.as_str()),
        ("SecretNotFound", "spec.output.credentialsSecretRef")
    );
    assert!(missing.is_in_reference(), "creating the Secret heals it");
    let wrong = validate(
        &e,
        &with(RefCheck::NoVariables {
            prefix: "AWS_",
            keys: vec!["access_key".into(), "secret_key".into()],
        }),
    )
    .unwrap_err();
    assert_eq!(
        (wrong.reason, wrong.field.as_str()),
        ("KeyNotFound", "spec.output.credentialsSecretRef")
    );
    assert!(wrong.is_in_reference());
    for words in ["AWS_*", "access_key, secret_key", "AWS_ACCESS_KEY_ID"] {
        assert!(wrong.message.contains(words), "{wrong}");
    }
}

fn valid_with(e: &EpicExport, observed: &Observed) {
    validate(e, observed).unwrap_or_else(|err| panic!("refused: {err}"));
}

#[test]
fn extra_pod_labels_are_labels_and_not_the_operators_own() {
    for (labels, ok) in [
        ("{azure.workload.identity/use: \"true\"}", true),
        ("{team: research, cost-center: \"\"}", true),
        ("{fhirexport.dev/export: other}", false),
        ("{app.kubernetes.io/name: other}", false),
        ("{\"bad key\": x}", false),
        ("{\"Example.org/x\": x}", false),
        ("{team: \"not a value\"}", false),
        (&format!("{{team: {}}}", "a".repeat(63)), true),
        (&format!("{{team: {}}}", "a".repeat(64)), false),
    ] {
        let e = export(&format!("  job:\n    podLabels: {labels}\n"));
        match validate(&e, &present()) {
            Ok(_) => assert!(ok, "{labels} accepted"),
            Err(err) => {
                assert!(!ok, "{labels}: {err}");
                assert_eq!(err.field, "spec.job.podLabels", "{labels}: {err}");
            }
        }
    }
}

#[test]
fn status_shows_an_object_runs_url() {
    let e = with_output("{url: \"s3://phi-exports/epic\"}");
    let runs = [run(
        "nightly-29400000",
        RunState::Succeeded,
        "2026-11-27T02:00:00Z",
    )];
    let mut rep = report("nightly-29400000", "success");
    let url = "s3://phi-exports/epic/nightly/20261127T020000Z/";
    rep.message.as_mut().unwrap().output_dir = url.into();
    let s = next_status(&StatusInput {
        export: &e,
        runs: &runs,
        spec_error: None,
        plan: None,
        next: None,
        report: Some(&rep),
        public_keys: None,
        now: ts("2026-11-27T03:00:00Z"),
    });
    assert_eq!(s.last_run.unwrap().output_path.as_deref(), Some(url));
}
