//! Property tests (proptest) of what the operator computes from values it does not control: cron
//! expressions and time zones from the spec and times from the status never make scheduling, the
//! reconcile decision or key rotation panic, whatever `now` is; and the run report a pod leaves in its
//! termination message is always valid JSON of at most 4,096 bytes that parses back to what it
//! summarizes.

use std::time::Duration;

use epic_export::operator::controller::decide::decide;
use epic_export::operator::controller::model::{Run, RunState, Validated};
use epic_export::operator::controller::rotation::{RotationInput, RotationTiming, plan};
use epic_export::operator::crd::{EpicExport, KeyRotationStatus};
use epic_export::operator::job::{RunReportMessage, TERMINATION_MESSAGE_MAX};
use epic_export::operator::key_secret::KeyKids;
use epic_export::schedule::{self, ConcurrencyPolicy, Schedule, ScheduleInput};
use jiff::Timestamp;
use proptest::prelude::*;

/// Any representable instant, with the edges and the present more likely.
fn instant() -> impl Strategy<Value = Timestamp> {
    let (min, max) = (Timestamp::MIN.as_second(), Timestamp::MAX.as_second());
    prop_oneof![
        (min..=max).prop_map(|s| Timestamp::from_second(s).unwrap()),
        (1_700_000_000i64..1_900_000_000).prop_map(|s| Timestamp::from_second(s).unwrap()),
        Just(Timestamp::MIN),
        Just(Timestamp::MAX),
        Just(Timestamp::from_second(max - 1).unwrap()),
        Just(Timestamp::from_second(min + 1).unwrap()),
    ]
}

/// Text that looks like a cron field, or anything at all.
fn cron_field() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("*".to_string()),
        "[0-9]{1,3}",
        "[0-9]{1,2}-[0-9]{1,2}",
        "\\*/[0-9]{1,3}",
        "[0-9]{1,2}/[0-9]{1,2}",
        "[0-9]{1,2}(,[0-9]{1,2}){0,4}",
        "(JAN|FEB|MON|SUN|L|W|\\?|#)",
        "\\PC{0,6}",
    ]
}

fn cron() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::collection::vec(cron_field(), 5).prop_map(|f| f.join(" ")),
        proptest::collection::vec(cron_field(), 0..8).prop_map(|f| f.join(" ")),
        "@[a-z]{0,10}",
        Just("0 0 30 2 *".to_string()),
        Just("0 0 31 4 *".to_string()),
        Just("59 23 31 12 *".to_string()),
        Just("0 0 29 2 1".to_string()),
        "\\PC{0,40}",
    ]
}

fn time_zone() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        proptest::sample::select(vec![
            "UTC",
            "America/Chicago",
            "Europe/Paris",
            "Australia/Lord_Howe",
            "Pacific/Kiritimati",
            "Asia/Kathmandu",
            "Local",
            "",
            " UTC",
            "Mars/Olympus",
            "../../etc/passwd",
        ])
        .prop_map(|z| Some(z.to_string())),
        "\\PC{0,30}".prop_map(Some),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Parsing never panics, on any text.
    #[test]
    fn schedule_parsing_never_panics(expr in "\\PC{0,60}", zone in time_zone()) {
        let _ = Schedule::parse(&expr, zone.as_deref());
    }

}

proptest! {
    // Each case walks croner over up to 101 occurrences (and impossible dates such as 30 February
    // over years): fewer cases keep the suite quick in debug builds.
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// For any schedule that parses and any instants: the next time is strictly later, the most
    /// recent missed one lies in its window, and the CronJob decision never panics.
    #[test]
    fn schedule_arithmetic_never_panics(
        expr in cron(),
        zone in time_zone(),
        since in instant(),
        now in instant(),
        deadline in proptest::option::of(any::<u64>()),
        suspend in any::<bool>(),
    ) {
        let Ok(schedule) = Schedule::parse(&expr, zone.as_deref()) else {
            return Ok(());
        };
        if let Some(next) = schedule.next_after(now) {
            prop_assert!(next > now, "{expr}: {next} is not after {now}");
        }
        if let Some((latest, count)) = schedule.most_recent_missed(since, now) {
            prop_assert!(latest > since && latest <= now, "{expr}: {latest} not in ({since}, {now}]");
            prop_assert!(count >= 1);
        }
        let active = vec![schedule::job_name("nightly", now)];
        let decision = schedule::decide(&ScheduleInput {
            schedule: &schedule,
            suspend,
            concurrency: ConcurrencyPolicy::Forbid,
            starting_deadline: deadline.map(Duration::from_secs),
            last_scheduled: Some(since),
            created: since,
            active: &active,
            now,
        });
        if let Some(start) = decision.start {
            prop_assert!(start <= now);
        }
    }

    /// The reconcile decision with whatever the status and metadata say (times that do not parse,
    /// times at the edges of the representable range, any deadline).
    #[test]
    fn the_decision_never_panics_on_status_values(
        last_schedule in prop_oneof![
            "\\PC{0,30}",
            instant().prop_map(|t| t.to_string()),
            Just("-009999-01-01T00:00:00Z".to_string()),
            Just("9999-12-31T23:59:59Z".to_string()),
        ],
        created in instant(),
        now in instant(),
        deadline in proptest::option::of(any::<i64>()),
        run_now in proptest::option::of("\\PC{0,20}"),
        expr in prop_oneof![Just("0 * * * *"), Just("*/5 * * * *"), Just("0 0 29 2 *")],
    ) {
        let mut export: EpicExport = serde_json::from_value(serde_json::json!({
            "apiVersion": "fhirexport.dev/v1alpha1",
            "kind": "EpicExport",
            "metadata": {"name": "nightly", "namespace": "phi", "uid": "u-1"},
            "spec": {
                "schedule": expr,
                "fhir": {"baseUrl": "https://fhir.example.org/R4"},
                "auth": {"clientId": "abc", "keySecretRef": {"name": "k", "key": "private.pem"}},
                "source": {"bulk": {"level": "system"}},
                "output": {"volumeClaimName": "exports"},
            },
            "status": {"lastScheduleTime": last_schedule},
        }))
        .unwrap();
        export.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(created));
        export.spec.starting_deadline_seconds = deadline;
        if let Some(token) = run_now {
            export.metadata.annotations =
                Some([("fhirexport.dev/run-now".to_string(), token)].into());
        }
        let valid = Validated {
            schedule: Schedule::parse(expr, None).unwrap(),
            concurrency: ConcurrencyPolicy::Replace,
            rotate_every: None,
        };
        let _ = decide(&export, &valid, &[], now);
    }

    /// Key rotation with whatever times the status holds and whatever the runs say, at any `now`.
    #[test]
    fn key_rotation_never_panics_on_status_times(
        now in instant(),
        published in proptest::option::of(prop_oneof!["\\PC{0,20}", instant().prop_map(|t| t.to_string())]),
        switched in proptest::option::of(instant().prop_map(|t| t.to_string())),
        last_rotation in proptest::option::of(instant().prop_map(|t| t.to_string())),
        secret_created in proptest::option::of(instant()),
        run_times in proptest::collection::vec((instant(), proptest::option::of(instant())), 0..4),
        every_minutes in proptest::option::of(60i64..=100 * 366 * 24 * 60),
        slots in 0usize..3,
        request in proptest::option::of("\\PC{0,10}"),
    ) {
        let kids = KeyKids {
            active: "a".into(),
            next: (slots == 1).then(|| "n".into()),
            retiring: (slots == 2).then(|| "r".into()),
        };
        let previous = KeyRotationStatus {
            phase: "Publishing".into(),
            next_kid: Some("n".into()),
            retiring_kid: Some("r".into()),
            published_at: published,
            switched_at: switched,
            last_rotation_time: last_rotation,
            ..KeyRotationStatus::default()
        };
        let runs: Vec<Run> = run_times
            .into_iter()
            .enumerate()
            .map(|(i, (created, finished))| Run {
                name: format!("run-{i}"),
                uid: None,
                state: if finished.is_some() { RunState::Succeeded } else { RunState::Active },
                scheduled_at: None,
                created: Some(created),
                started: Some(created),
                finished,
                failure: None,
            })
            .collect();
        let timing = RotationTiming {
            cache_lifetime: Duration::from_secs(104_400),
            margin: Duration::from_secs(60),
            last_use_grace: Duration::from_secs(300),
        };
        let step = plan(&RotationInput {
            now,
            every: every_minutes.map(jiff::SignedDuration::from_mins),
            request: request.as_deref(),
            previous: Some(&previous),
            kids: &kids,
            secret_created,
            runs: &runs,
            timing,
        });
        // Without a change to make now, the next look is not in the past.
        if step.change.is_none() && let Some(wake) = step.wake_at {
            prop_assert!(wake >= now, "wake {wake} before now {now}: {step:?}");
        }
    }
}

/// Any text: multi-byte UTF-8, control characters (escaped to six bytes in JSON), quotes.
fn text(max: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::collection::vec(any::<char>(), 0..max).prop_map(|c| c.into_iter().collect()),
        proptest::collection::vec(
            proptest::sample::select(vec!['é', '日', '𝄞', '\u{0}', '\u{1f}', '"', '\\', 'a']),
            0..max
        )
        .prop_map(|c| c.into_iter().collect()),
    ]
}

fn report() -> impl Strategy<Value = RunReportMessage> {
    (
        text(40),
        text(40),
        text(40),
        text(40),
        any::<u64>(),
        any::<u64>(),
        proptest::collection::btree_map(text(40), any::<u64>(), 0..150),
        proptest::collection::vec(text(1500), 0..60),
        text(3000),
        proptest::option::of(text(60)),
        prop_oneof![Just(0usize), any::<usize>()],
    )
        .prop_map(
            |(
                outcome,
                run_id,
                started_at,
                finished_at,
                records,
                bytes,
                by_type,
                errors,
                dir,
                tt,
                omitted,
            )| {
                RunReportMessage {
                    outcome,
                    run_id,
                    started_at,
                    finished_at,
                    records,
                    bytes,
                    records_by_type: by_type,
                    attachments: records / 3,
                    attachment_bytes: bytes / 2,
                    errors,
                    output_dir: dir,
                    transaction_time: tt,
                    errors_omitted: omitted,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// The termination message is valid JSON of at most 4,096 bytes, parses back, keeps the counts,
    /// accounts for every error (kept, in order and shortened, or counted as omitted), and is the
    /// report itself when that fits.
    #[test]
    fn the_run_report_always_fits_the_termination_message(report in report()) {
        let message = report.to_message().unwrap();
        prop_assert!(
            message.len() <= TERMINATION_MESSAGE_MAX,
            "{} bytes", message.len()
        );
        let back: RunReportMessage = serde_json::from_str(message.trim())
            .map_err(|e| TestCaseError::fail(format!("not a report: {e}: {message}")))?;
        prop_assert_eq!(back.records, report.records);
        prop_assert_eq!(back.bytes, report.bytes);
        prop_assert!(back.errors.len() <= report.errors.len());
        prop_assert_eq!(
            back.errors_omitted,
            report
                .errors_omitted
                .saturating_add(report.errors.len() - back.errors.len())
        );
        for (kept, original) in back.errors.iter().zip(&report.errors) {
            let stem = kept.strip_suffix('…').unwrap_or(kept);
            prop_assert!(original.starts_with(stem), "{kept:?} is not from {original:?}");
        }
        let short_errors = report.errors.iter().all(|e| e.len() <= 300);
        if short_errors && serde_json::to_string(&report).unwrap().len() <= TERMINATION_MESSAGE_MAX {
            prop_assert_eq!(back, report);
        }
    }
}

#[test]
fn a_huge_report_is_cut_quickly() {
    let report = RunReportMessage {
        outcome: "failed".into(),
        errors: vec!["x".repeat(400); 200_000],
        records_by_type: (0..10_000).map(|i| (format!("Type{i}"), i)).collect(),
        output_dir: "\u{1}".repeat(100_000),
        ..RunReportMessage::default()
    };
    let started = std::time::Instant::now();
    let message = report.to_message().unwrap();
    assert!(message.len() <= TERMINATION_MESSAGE_MAX);
    let back: RunReportMessage = serde_json::from_str(&message).unwrap();
    assert_eq!(back.outcome, "failed");
    assert_eq!(back.errors.len() + back.errors_omitted, 200_000);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}
