//! Reconcile step for key rotation (pure): from the key Secret's slots, the previous rotation status,
//! the runs and the clock, decide the one Secret change to make now (if any), the new
//! `status.keyRotation`, the Events to emit and when to look again.
//!
//! The steps (the JWK Set URL lets a server see the old and the next key at once): generate a next
//! key into the Secret (on the `fhirexport.dev/rotate-key` annotation, or when `every` has passed since the last switch) → both keys are published → wait the
//! JWKS cache lifetime plus a margin → switch signing (`next-<key>` becomes `<key>`, the old key becomes
//! `retiring-<key>`) → wait until no run started before the switch is left, then 5 minutes more (the
//! longest a client assertion lives) → retire the old key.
//!
//! The Secret is the source of truth for where a rotation stands; the status only carries the times.
//! When the status is lost or belongs to other keys (an interrupted rotation, a restored backup), every
//! wait restarts from now, which only makes it longer; so does a recorded time that cannot be right (in
//! the future, or unparsable). Times add with saturation, never overflow. The signing key is always in
//! the Secret, so it never leaves the JWKS.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use super::model::{Note, Run, RunState, rfc3339};
use crate::operator::crd::KeyRotationStatus;
use crate::operator::key_secret::{KeyChange, KeyKids};

/// Annotation whose new value starts a key rotation:
/// `kubectl annotate epx NAME fhirexport.dev/rotate-key="$(date +%s)" --overwrite`.
pub const ROTATE_KEY_ANNOTATION: &str = "fhirexport.dev/rotate-key";

/// Where a rotation stands, as `status.keyRotation.phase` shows it (the CRD keeps the field a
/// string: its schema stays as it is).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RotationPhase {
    /// Only the signing key (none rotating).
    Idle,
    /// A next key is being generated into the Secret.
    Generating,
    /// The next key is published beside the signing key, waiting out the JWKS caches.
    Publishing,
    /// Signing switched; the old key stays published until nobody can still use it.
    Retiring,
    /// The rotation cannot go on (e.g. the operator may not update the Secret).
    Blocked,
}

impl RotationPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            RotationPhase::Idle => "Idle",
            RotationPhase::Generating => "Generating",
            RotationPhase::Publishing => "Publishing",
            RotationPhase::Retiring => "Retiring",
            RotationPhase::Blocked => "Blocked",
        }
    }
}

/// The waits of a rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RotationTiming {
    /// The `Cache-Control: max-age` the JWKS endpoint sends outside rotations: how long a server may
    /// keep a set without the next key.
    pub cache_lifetime: Duration,
    /// Added to every wait: JWKS refresh in every replica, clock skew, kubelet Secret sync.
    pub margin: Duration,
    /// How long the old key stays published after its last use (a client assertion lives ≤ 5 min).
    pub last_use_grace: Duration,
}

impl Default for RotationTiming {
    fn default() -> Self {
        RotationTiming {
            cache_lifetime: Duration::from_secs(3600),
            margin: Duration::from_secs(60),
            last_use_grace: Duration::from_secs(300),
        }
    }
}

/// Everything the rotation decision depends on.
#[derive(Clone, Debug)]
pub struct RotationInput<'a> {
    pub now: Timestamp,
    /// `spec.auth.rotation.every`, parsed.
    pub every: Option<SignedDuration>,
    /// The value of the rotate-key annotation, if any.
    pub request: Option<&'a str>,
    pub previous: Option<&'a KeyRotationStatus>,
    pub kids: &'a KeyKids,
    /// When the key Secret was created: the age of a key never rotated here.
    pub secret_created: Option<Timestamp>,
    pub runs: &'a [Run],
    pub timing: RotationTiming,
}

/// What to do now.
#[derive(Clone, Debug, PartialEq)]
pub struct RotationPlan {
    /// The Secret change to make, if any.
    pub change: Option<KeyChange>,
    /// The new `status.keyRotation` (assuming the change succeeds).
    pub status: KeyRotationStatus,
    /// Events for this step (emitted once the change is written).
    pub notes: Vec<Note>,
    /// When to look again (a wait ends); `None`: a watch event will bring the next step.
    pub wake_at: Option<Timestamp>,
}

/// Decides the rotation step.
pub fn plan(input: &RotationInput<'_>) -> RotationPlan {
    let now = input.now;
    let previous = input.previous.cloned().unwrap_or_default();
    let kids = input.kids;
    let mut status = KeyRotationStatus {
        signing_kid: Some(kids.active.clone()),
        next_kid: kids.next.clone(),
        retiring_kid: kids.retiring.clone(),
        last_rotation_time: previous.last_rotation_time.clone(),
        request_handled: previous.request_handled.clone(),
        ..KeyRotationStatus::default()
    };
    let pending_request = input
        .request
        .filter(|r| previous.request_handled.as_deref() != Some(*r));
    let mut notes = Vec::new();
    let timing = input.timing;

    if let Some(retiring) = &kids.retiring {
        // Signing switched; the old key stays until nobody can still be using it.
        let switched_at = same_key(&previous.retiring_kid, retiring)
            .then(|| parse_past(&previous.switched_at, now))
            .flatten()
            .unwrap_or(now);
        status.phase = RotationPhase::Retiring.as_str().into();
        status.switched_at = Some(rfc3339(switched_at));
        // A run created before the switch (plus the margin, for the kubelet's copy of the Secret)
        // may sign with the old key until it ends.
        let cutoff = later(switched_at, timing.margin);
        let old_users: Vec<&Run> = input
            .runs
            .iter()
            .filter(|r| r.created.is_some_and(|c| c < cutoff))
            .collect();
        if let Some(active) = old_users.iter().find(|r| r.state == RunState::Active) {
            status.message = Some(format!(
                "keeping the old key {retiring} published: run {} started before the switch and may still sign with it",
                active.name
            ));
            return RotationPlan {
                change: None,
                status,
                notes,
                wake_at: Some(cutoff).filter(|c| *c > now),
            };
        }
        let last_use = old_users
            .iter()
            .filter_map(|r| r.finished)
            .fold(cutoff, Timestamp::max);
        let retire_after = later(last_use, timing.last_use_grace);
        if now < retire_after {
            status.retire_after = Some(rfc3339(retire_after));
            status.message = Some(format!(
                "the old key {retiring} leaves the JWKS at {} (5 minutes after its last possible use)",
                rfc3339(retire_after)
            ));
            return RotationPlan {
                change: None,
                status,
                notes,
                wake_at: Some(retire_after),
            };
        }
        notes.push(Note {
            warning: false,
            reason: "OldKeyRetired",
            message: format!(
                "key rotation complete: the old key {retiring} is no longer published; signing key {}",
                kids.active
            ),
        });
        status.phase = RotationPhase::Idle.as_str().into();
        status.retiring_kid = None;
        status.switched_at = None;
        let due = next_rotation(input, &status);
        status.next_rotation_time = due.map(rfc3339);
        return RotationPlan {
            change: Some(KeyChange::Retire),
            status,
            notes,
            wake_at: due,
        };
    }

    if let Some(next) = &kids.next {
        // Published beside the signing key; switch once every cache can have seen it.
        let first_seen = !same_key(&previous.next_kid, next) || previous.published_at.is_none();
        let published_at = if first_seen {
            now
        } else {
            parse_past(&previous.published_at, now).unwrap_or(now)
        };
        let switch_after = later(later(published_at, timing.cache_lifetime), timing.margin);
        if let Some(r) = pending_request {
            status.request_handled = Some(r.to_owned());
        }
        if now < switch_after {
            if first_seen {
                notes.push(Note {
                    warning: false,
                    reason: "NextKeyPublished",
                    message: format!(
                        "next key {next} published beside signing key {}; signing switches at {}",
                        kids.active,
                        rfc3339(switch_after)
                    ),
                });
            }
            status.phase = RotationPhase::Publishing.as_str().into();
            status.published_at = Some(rfc3339(published_at));
            status.switch_after = Some(rfc3339(switch_after));
            status.message = Some(format!(
                "waiting out the JWKS cache lifetime ({} s) plus a margin before signing with {next}",
                timing.cache_lifetime.as_secs()
            ));
            return RotationPlan {
                change: None,
                status,
                notes,
                wake_at: Some(switch_after),
            };
        }
        notes.push(Note {
            warning: false,
            reason: "SigningKeySwitched",
            message: format!(
                "runs now sign with key {next}; the old key {} stays published until 5 minutes after its last use",
                kids.active
            ),
        });
        status.phase = RotationPhase::Retiring.as_str().into();
        status.signing_kid = Some(next.clone());
        status.next_kid = None;
        status.retiring_kid = Some(kids.active.clone());
        status.switched_at = Some(rfc3339(now));
        status.last_rotation_time = Some(rfc3339(now));
        return RotationPlan {
            change: Some(KeyChange::Switch),
            status,
            notes,
            wake_at: Some(later(now, timing.margin)),
        };
    }

    // Idle: only the signing key.
    status.phase = RotationPhase::Idle.as_str().into();
    let due = next_rotation(input, &status);
    let why = match (pending_request, due) {
        (Some(r), _) => Some(format!("requested ({ROTATE_KEY_ANNOTATION}={r:?})")),
        (None, Some(due)) if due <= now => Some(format!(
            "the key is older than spec.auth.rotation.every (due {})",
            rfc3339(due)
        )),
        _ => None,
    };
    let Some(why) = why else {
        status.next_rotation_time = due.map(rfc3339);
        return RotationPlan {
            change: None,
            status,
            notes,
            wake_at: due,
        };
    };
    if let Some(r) = pending_request {
        status.request_handled = Some(r.to_owned());
    }
    status.phase = RotationPhase::Generating.as_str().into();
    status.message = Some(format!("generating a next key: {why}"));
    notes.push(Note {
        warning: false,
        reason: "KeyRotationStarted",
        message: format!(
            "key rotation started ({why}): a next key is generated beside signing key {}",
            kids.active
        ),
    });
    RotationPlan {
        change: Some(KeyChange::AddNext),
        status,
        notes,
        wake_at: None,
    }
}

/// When `every` is due next: from the last switch, else from the key Secret's creation.
fn next_rotation(input: &RotationInput<'_>, status: &KeyRotationStatus) -> Option<Timestamp> {
    let every = input.every?;
    let base = parse_past(&status.last_rotation_time, input.now).or(input.secret_created)?;
    base.checked_add(every).ok()
}

/// `t + d`, saturating at the latest representable time.
fn later(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_add(d).unwrap_or(Timestamp::MAX)
}

/// A recorded time, if it parses and is not after `now` (a time from the future cannot be right).
fn parse_past(t: &Option<String>, now: Timestamp) -> Option<Timestamp> {
    parse(t).filter(|t| *t <= now)
}

fn same_key(recorded: &Option<String>, kid: &str) -> bool {
    recorded.as_deref() == Some(kid)
}

fn parse(t: &Option<String>) -> Option<Timestamp> {
    t.as_deref().and_then(|t| t.parse().ok())
}

/// A rotation that cannot go on (e.g. the operator may not update the Secret): the status to
/// show, keeping everything else as planned.
pub fn blocked(
    plan: &RotationPlan,
    previous: Option<&KeyRotationStatus>,
    why: &str,
) -> KeyRotationStatus {
    let previous = previous.cloned().unwrap_or_default();
    KeyRotationStatus {
        phase: RotationPhase::Blocked.as_str().into(),
        message: Some(why.to_owned()),
        // Not acted on: a retry (or a fixed RBAC) takes the same request again.
        request_handled: previous.request_handled,
        last_rotation_time: previous.last_rotation_time,
        ..plan.status.clone()
    }
}
