//! The key rotation state machine (pure, with an injected clock): each step, the cache-lifetime and
//! last-use waits, runs that started before the switch, interruption and resume (also with the status
//! lost, or with times that cannot be right), `every`, and the key Secret edits that carry out each
//! step.

use std::collections::BTreeMap;
use std::time::Duration;

use epic_export::auth::keys::{Algorithm, SigningKey};
use epic_export::operator::controller::model::{Run, RunState};
use epic_export::operator::controller::rotation::{
    RotationInput, RotationPlan, RotationTiming, plan,
};
use epic_export::operator::controller::validate::parse_every;
use epic_export::operator::crd::KeyRotationStatus;
use epic_export::operator::key_secret::{self, KeyChange, KeyKids, Signing};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;

const TIMING: RotationTiming = RotationTiming {
    cache_lifetime: Duration::from_secs(3600),
    margin: Duration::from_secs(60),
    last_use_grace: Duration::from_secs(300),
};

fn t0() -> Timestamp {
    "2026-03-01T12:00:00Z".parse().unwrap()
}

fn at(secs: i64) -> Timestamp {
    t0() + SignedDuration::from_secs(secs)
}

fn kids(active: &str, next: Option<&str>, retiring: Option<&str>) -> KeyKids {
    KeyKids {
        active: active.into(),
        next: next.map(Into::into),
        retiring: retiring.map(Into::into),
    }
}

fn run(name: &str, created: i64, finished: Option<i64>) -> Run {
    Run {
        name: name.into(),
        uid: None,
        state: if finished.is_some() {
            RunState::Succeeded
        } else {
            RunState::Active
        },
        scheduled_at: None,
        created: Some(at(created)),
        started: Some(at(created)),
        finished: finished.map(at),
        failure: None,
    }
}

struct Case<'a> {
    now: i64,
    every: Option<&'a str>,
    request: Option<&'a str>,
    previous: Option<&'a KeyRotationStatus>,
    kids: KeyKids,
    runs: Vec<Run>,
}

impl Case<'_> {
    fn plan(&self) -> RotationPlan {
        plan(&RotationInput {
            now: at(self.now),
            every: self.every.map(|e| parse_every(e).unwrap()),
            request: self.request,
            previous: self.previous,
            kids: &self.kids,
            secret_created: Some(t0()),
            runs: &self.runs,
            timing: TIMING,
        })
    }
}

fn idle(k: KeyKids) -> Case<'static> {
    Case {
        now: 0,
        every: None,
        request: None,
        previous: None,
        kids: k,
        runs: Vec::new(),
    }
}

fn reasons(p: &RotationPlan) -> Vec<&str> {
    p.notes.iter().map(|n| n.reason).collect()
}

#[test]
fn a_full_rotation_step_by_step_with_its_waits() {
    // Idle, no request: nothing to do, nothing to wake for.
    let p = idle(kids("A", None, None)).plan();
    assert_eq!(
        (p.change.clone(), p.status.phase.as_str(), p.wake_at),
        (None, "Idle", None)
    );

    // A request starts it: generate the next key.
    let p = Case {
        request: Some("1"),
        ..idle(kids("A", None, None))
    }
    .plan();
    assert_eq!(p.change, Some(KeyChange::AddNext));
    assert_eq!(p.status.phase, "Generating");
    assert_eq!(p.status.request_handled.as_deref(), Some("1"));
    assert_eq!(reasons(&p), ["KeyRotationStarted"]);
    let generating = p.status;

    // The next key appears in the Secret: published, switch after cache lifetime + margin.
    let p = Case {
        now: 5,
        request: Some("1"),
        previous: Some(&generating),
        ..idle(kids("A", Some("B"), None))
    }
    .plan();
    assert_eq!(
        p.change, None,
        "never switch before the caches can have the next key"
    );
    assert_eq!(p.status.phase, "Publishing");
    assert_eq!(
        p.status.published_at.as_deref(),
        Some("2026-03-01T12:00:05Z")
    );
    assert_eq!(p.wake_at, Some(at(5 + 3600 + 60)));
    assert_eq!(
        p.status.switch_after.as_deref(),
        Some("2026-03-01T13:01:05Z")
    );
    assert_eq!(reasons(&p), ["NextKeyPublished"]);
    let publishing = p.status;

    // Still waiting one second before the end: no change, no repeated Event, same times.
    let p = Case {
        now: 5 + 3600 + 59,
        request: Some("1"),
        previous: Some(&publishing),
        ..idle(kids("A", Some("B"), None))
    }
    .plan();
    assert_eq!((p.change.clone(), p.notes.len()), (None, 0));
    assert_eq!(p.status, publishing);

    // The wait is over: switch.
    let p = Case {
        now: 5 + 3600 + 60,
        request: Some("1"),
        previous: Some(&publishing),
        ..idle(kids("A", Some("B"), None))
    }
    .plan();
    assert_eq!(p.change, Some(KeyChange::Switch));
    assert_eq!(p.status.signing_kid.as_deref(), Some("B"));
    assert_eq!(p.status.retiring_kid.as_deref(), Some("A"));
    assert_eq!(p.status.next_kid, None);
    assert_eq!(reasons(&p), ["SigningKeySwitched"]);
    let switched = p.status;
    let switch_time = 5 + 3600 + 60;

    // After the switch: the old key stays for the margin (runs created just after the switch may
    // have an old copy of the Secret) plus 5 minutes.
    let p = Case {
        now: switch_time + 1,
        request: Some("1"),
        previous: Some(&switched),
        ..idle(kids("B", None, Some("A")))
    }
    .plan();
    assert_eq!(p.change, None);
    assert_eq!(p.status.phase, "Retiring");
    assert_eq!(p.wake_at, Some(at(switch_time + 60 + 300)));
    let retiring = p.status;

    let p = Case {
        now: switch_time + 60 + 300,
        request: Some("1"),
        previous: Some(&retiring),
        ..idle(kids("B", None, Some("A")))
    }
    .plan();
    assert_eq!(p.change, Some(KeyChange::Retire));
    assert_eq!(p.status.phase, "Idle");
    assert_eq!(p.status.signing_kid.as_deref(), Some("B"));
    assert_eq!(p.status.retiring_kid, None);
    assert_eq!(reasons(&p), ["OldKeyRetired"]);
    let done = p.status;

    // The same request value does not start another rotation.
    let p = Case {
        now: switch_time + 1000,
        request: Some("1"),
        previous: Some(&done),
        ..idle(kids("B", None, None))
    }
    .plan();
    assert_eq!(p.change, None);
    assert_eq!(
        p.status.last_rotation_time.as_deref(),
        Some("2026-03-01T13:01:05Z")
    );
}

#[test]
fn the_old_key_stays_while_a_run_from_before_the_switch_is_active_and_5_minutes_after_it_ends() {
    let switched = KeyRotationStatus {
        phase: "Retiring".into(),
        retiring_kid: Some("A".into()),
        switched_at: Some(at(1000).to_string()),
        ..KeyRotationStatus::default()
    };
    let case = |now: i64, runs: Vec<Run>| {
        Case {
            now,
            previous: Some(&switched),
            runs,
            ..idle(kids("B", None, Some("A")))
        }
        .plan()
    };
    // A run created before the switch is still going, hours later: keep the old key.
    let p = case(
        1000 + 7200,
        vec![run("old", 900, None), run("new", 2000, None)],
    );
    assert_eq!(p.change, None);
    assert!(p.status.message.unwrap().contains("run old"));
    assert_eq!(p.wake_at, None, "the Job's watch brings the next pass");
    // It finished at 9000: retire 300 s later, not before.
    let p = case(9000 + 299, vec![run("old", 900, Some(9000))]);
    assert_eq!((p.change.clone(), p.wake_at), (None, Some(at(9300))));
    let p = case(9300, vec![run("old", 900, Some(9000))]);
    assert_eq!(p.change, Some(KeyChange::Retire));
    // Runs created after the switch (plus margin) do not hold the old key.
    let p = case(1000 + 60 + 300, vec![run("new", 1000 + 61, None)]);
    assert_eq!(p.change, Some(KeyChange::Retire));
}

#[test]
fn an_interrupted_rotation_resumes_from_the_secret_and_only_waits_longer_without_status() {
    // The operator died after generating (status still says Generating, or nothing at all): the
    // next key is in the Secret, so it is published now and the wait starts now.
    for previous in [
        None,
        Some(KeyRotationStatus {
            phase: "Generating".into(),
            request_handled: Some("1".into()),
            ..KeyRotationStatus::default()
        }),
    ] {
        let p = Case {
            now: 50,
            request: Some("1"),
            previous: previous.as_ref(),
            ..idle(kids("A", Some("B"), None))
        }
        .plan();
        assert_eq!(p.change, None);
        assert_eq!(p.status.phase, "Publishing");
        assert_eq!(p.wake_at, Some(at(50 + 3660)));
        assert_eq!(p.status.request_handled.as_deref(), Some("1"));
    }
    // Resumed with its status: the original publish time counts.
    let publishing = KeyRotationStatus {
        phase: "Publishing".into(),
        next_kid: Some("B".into()),
        published_at: Some(at(0).to_string()),
        ..KeyRotationStatus::default()
    };
    let p = Case {
        now: 3660,
        previous: Some(&publishing),
        ..idle(kids("A", Some("B"), None))
    }
    .plan();
    assert_eq!(p.change, Some(KeyChange::Switch));
    // A status about another next key (the Secret was edited by hand) does not count.
    let p = Case {
        now: 3660,
        previous: Some(&publishing),
        ..idle(kids("A", Some("C"), None))
    }
    .plan();
    assert_eq!(p.change, None);
    assert_eq!(p.wake_at, Some(at(3660 + 3660)));
    // Died after switching, status lost: the retire wait restarts now.
    let p = Case {
        now: 7000,
        ..idle(kids("B", None, Some("A")))
    }
    .plan();
    assert_eq!(p.change, None);
    assert_eq!(p.wake_at, Some(at(7000 + 360)));
}

#[test]
fn every_rotates_when_the_key_is_old_enough() {
    // Never rotated: counted from the Secret's creation (t0).
    let p = Case {
        now: 89 * 86400,
        every: Some("90d"),
        ..idle(kids("A", None, None))
    }
    .plan();
    assert_eq!(p.change, None);
    assert_eq!(p.wake_at, Some(at(90 * 86400)));
    assert_eq!(
        p.status.next_rotation_time.as_deref(),
        Some("2026-05-30T12:00:00Z")
    );
    let p = Case {
        now: 90 * 86400,
        every: Some("90d"),
        ..idle(kids("A", None, None))
    }
    .plan();
    assert_eq!(p.change, Some(KeyChange::AddNext));
    assert!(
        p.notes[0]
            .message
            .contains("older than spec.auth.rotation.every")
    );
    // After a rotation, counted from its switch.
    let rotated = KeyRotationStatus {
        phase: "Idle".into(),
        last_rotation_time: Some(at(100 * 86400).to_string()),
        ..KeyRotationStatus::default()
    };
    let p = Case {
        now: 150 * 86400,
        every: Some("90d"),
        previous: Some(&rotated),
        ..idle(kids("B", None, None))
    }
    .plan();
    assert_eq!((p.change, p.wake_at), (None, Some(at(190 * 86400))));
}

#[test]
fn a_retiring_key_is_dropped_before_a_new_next_key_is_switched_to() {
    // A next key staged while the last rotation's old key is still retiring: retire first.
    let p = Case {
        now: 10_000,
        ..idle(kids("B", Some("C"), Some("A")))
    }
    .plan();
    assert_eq!(p.status.phase, "Retiring");
    assert_ne!(p.change, Some(KeyChange::Switch));
}

#[test]
fn every_is_parsed_with_units_and_a_floor() {
    assert_eq!(
        parse_every("90d").unwrap(),
        SignedDuration::from_hours(90 * 24)
    );
    assert_eq!(
        parse_every("12w").unwrap(),
        SignedDuration::from_hours(12 * 7 * 24)
    );
    assert_eq!(parse_every("36h").unwrap(), SignedDuration::from_hours(36));
    assert_eq!(parse_every("60m").unwrap(), SignedDuration::from_hours(1));
    for bad in ["", "d", "90", "90y", "30m", "-1d", "9999999999999w"] {
        assert!(parse_every(bad).is_err(), "{bad:?} accepted");
    }
    assert!(
        parse_every("90x")
            .unwrap_err()
            .to_string()
            .contains("use m, h, d or w")
    );
}

fn pem(alg: Algorithm) -> (String, String) {
    let key = SigningKey::generate(alg).unwrap();
    (key.to_pkcs8_pem().unwrap(), key.kid().to_owned())
}

fn secret(data: &BTreeMap<String, ByteString>) -> Secret {
    Secret {
        data: Some(data.clone()),
        ..Secret::default()
    }
}

#[test]
fn secret_edits_carry_out_each_step_and_the_jwks_always_holds_the_signing_key() {
    let (a_pem, a) = pem(Algorithm::ES384);
    let (b_pem, b) = pem(Algorithm::ES384);
    let mut data = BTreeMap::from([
        ("private.pem".to_owned(), ByteString(a_pem.into_bytes())),
        ("other".to_owned(), ByteString(b"kept".to_vec())),
    ]);
    let signing = Signing::default();
    let read = |d: &BTreeMap<String, ByteString>| {
        key_secret::read(&secret(d), "private.pem", &signing).unwrap()
    };
    let published = |d: &BTreeMap<String, ByteString>| -> Vec<String> {
        read(d).jwks()["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(published(&data), [a.as_str()]);

    key_secret::edit(&mut data, "private.pem", &KeyChange::AddNext, Some(b_pem)).unwrap();
    assert_eq!(read(&data).kids(), kids(&a, Some(&b), None));
    assert_eq!(published(&data), [a.clone(), b.clone()]);
    assert!(read(&data).rotating());

    key_secret::edit(&mut data, "private.pem", &KeyChange::Switch, None).unwrap();
    assert_eq!(read(&data).kids(), kids(&b, None, Some(&a)));
    assert_eq!(published(&data), [b.clone(), a.clone()]);

    // A second switch or next key is refused in the wrong state, and nothing changes.
    let before = data.clone();
    assert!(key_secret::edit(&mut data, "private.pem", &KeyChange::Switch, None).is_err());
    assert_eq!(data, before);

    key_secret::edit(&mut data, "private.pem", &KeyChange::Retire, None).unwrap();
    assert_eq!(published(&data), [b.as_str()]);
    assert!(!read(&data).rotating());
    assert_eq!(data["other"].0, b"kept", "other data keys are left alone");
    assert!(key_secret::edit(&mut data, "private.pem", &KeyChange::Retire, None).is_err());

    // Only public members are published.
    let (c_pem, _) = pem(Algorithm::RS384);
    let rsa = BTreeMap::from([("private.pem".to_owned(), ByteString(c_pem.into_bytes()))]);
    let jwks = read(&rsa).jwks().to_string();
    for private in ["\"d\"", "\"p\"", "\"q\"", "\"dp\"", "\"dq\"", "\"qi\""] {
        assert!(!jwks.contains(private), "{private} published: {jwks}");
    }
}

#[test]
fn an_unusable_key_in_a_slot_is_named() {
    let (a_pem, _) = pem(Algorithm::ES256);
    let data = BTreeMap::from([
        ("private.pem".to_owned(), ByteString(a_pem.into_bytes())),
        (
            "next-private.pem".to_owned(),
            ByteString(b"not a key".to_vec()),
        ),
    ]);
    let err = key_secret::read(&secret(&data), "private.pem", &Signing::default()).unwrap_err();
    assert!(err.to_string().contains("\"next-private.pem\""), "{err}");
    let err = key_secret::read(&secret(&data), "key.pem", &Signing::default()).unwrap_err();
    assert!(
        matches!(err, key_secret::KeySetError::Missing { .. }),
        "{err}"
    );
}

/// Times in `status.keyRotation` come from the object, which anyone with status access (or a restored
/// backup) can set: one in the future, or at the end of time, restarts the wait from now instead of
/// postponing the rotation forever or overflowing.
#[test]
fn status_times_from_the_future_restart_the_wait_and_never_overflow() {
    for published in ["2999-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "not a time"] {
        let previous = KeyRotationStatus {
            phase: "Publishing".into(),
            signing_kid: Some("A".into()),
            next_kid: Some("B".into()),
            published_at: Some(published.into()),
            ..KeyRotationStatus::default()
        };
        let p = Case {
            now: 100,
            previous: Some(&previous),
            ..idle(kids("A", Some("B"), None))
        }
        .plan();
        assert_eq!(p.status.phase, "Publishing", "{published}");
        assert_eq!(
            p.status.published_at.as_deref(),
            Some("2026-03-01T12:01:40Z"),
            "{published}: the wait restarts now"
        );
        assert_eq!(p.wake_at, Some(at(100 + 3600 + 60)), "{published}");
    }
    // A switch recorded in the future: the old key is kept from now on, not until then.
    let previous = KeyRotationStatus {
        phase: "Retiring".into(),
        signing_kid: Some("B".into()),
        retiring_kid: Some("A".into()),
        switched_at: Some("9999-12-31T23:59:59Z".into()),
        ..KeyRotationStatus::default()
    };
    let p = Case {
        now: 100,
        previous: Some(&previous),
        ..idle(kids("B", None, Some("A")))
    }
    .plan();
    assert_eq!(
        p.status.switched_at.as_deref(),
        Some("2026-03-01T12:01:40Z")
    );
    assert_eq!(p.wake_at, Some(at(100 + 60 + 300)));
    // At the end of representable time, waits saturate there instead of overflowing.
    let end = plan(&RotationInput {
        now: Timestamp::MAX,
        every: Some(SignedDuration::from_hours(24 * 366 * 100)),
        request: None,
        previous: Some(&previous),
        kids: &kids("B", None, Some("A")),
        secret_created: Some(Timestamp::MIN),
        runs: &[run("old", 0, Some(10))],
        timing: TIMING,
    });
    // (Every wait ends at the last instant, which is now: the old key goes.)
    assert_eq!(end.change, Some(KeyChange::Retire));
}
