//! Leader election through a `coordination.k8s.io/v1` Lease, so that of several operator replicas
//! only one acts. The holder renews the Lease every `renew_every`; another replica takes it over only
//! once `renewTime + leaseDurationSeconds` has passed. Every write carries the Lease's
//! resourceVersion, so two replicas racing for it cannot both win (the loser gets a 409).
//!
//! Leader election is a second line of defence: run (Job) names are deterministic and an existing Job
//! is adopted, never duplicated, even if two replicas briefly both act.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::{Client, ResourceExt};

#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub namespace: String,
    pub name: String,
    /// This replica (its pod name).
    pub identity: String,
    /// How long a holder that stopped renewing keeps the lease.
    pub duration: Duration,
    /// How often the holder renews (and a standby retries).
    pub renew_every: Duration,
}

impl LeaseSettings {
    pub fn new(namespace: String, identity: String) -> LeaseSettings {
        LeaseSettings {
            namespace,
            name: "epic-export-operator".into(),
            identity,
            duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        }
    }
}

/// One attempt: take the lease if it is free, expired or already ours (then renew it). `Ok(true)`
/// when this replica holds it afterwards.
pub async fn try_acquire(api: &Api<Lease>, s: &LeaseSettings) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let duration = i32::try_from(s.duration.as_secs()).unwrap_or(i32::MAX);
    let Some(mut lease) = api.get_opt(&s.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(s.name.clone()),
                namespace: Some(s.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(s.identity.clone()),
                lease_duration_seconds: Some(duration),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return conflict_is_false(api.create(&PostParams::default(), &lease).await);
    };
    let mut spec = lease.spec.clone().unwrap_or_default();
    let ours = spec.holder_identity.as_deref() == Some(s.identity.as_str());
    if !ours {
        let held = spec
            .holder_identity
            .as_deref()
            .is_some_and(|h| !h.is_empty());
        let expires = spec.renew_time.as_ref().map(|t| {
            t.0.saturating_add(SignedDuration::from_secs(i64::from(
                spec.lease_duration_seconds.unwrap_or(duration),
            )))
        });
        if held && expires.is_some_and(|e| e.is_ok_and(|e| e > now)) {
            return Ok(false);
        }
        spec.holder_identity = Some(s.identity.clone());
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        tracing::info!(lease = %s.name, "taking over the lease");
    }
    spec.renew_time = Some(MicroTime(now));
    spec.lease_duration_seconds = Some(duration);
    lease.spec = Some(spec);
    let name = lease.name_any();
    conflict_is_false(api.replace(&name, &PostParams::default(), &lease).await)
}

fn conflict_is_false(result: Result<Lease, kube::Error>) -> Result<bool, kube::Error> {
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Waits until this replica holds the lease.
pub async fn acquire(client: &Client, s: &LeaseSettings) {
    let api: Api<Lease> = Api::namespaced(client.clone(), &s.namespace);
    let mut waiting_logged = false;
    loop {
        match try_acquire(&api, s).await {
            Ok(true) => {
                tracing::info!(lease = %s.name, identity = %s.identity, "became the leader");
                return;
            }
            Ok(false) if !waiting_logged => {
                tracing::info!(lease = %s.name, "another replica leads; standing by");
                waiting_logged = true;
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(lease = %s.name, "cannot read or write the lease: {e}"),
        }
        tokio::time::sleep(s.renew_every).await;
    }
}

/// Renews the lease until it is lost (another replica took it, or renewing failed for longer than
/// the lease lasts); then returns, and the caller must stop acting.
pub async fn hold(client: &Client, s: &LeaseSettings) {
    let api: Api<Lease> = Api::namespaced(client.clone(), &s.namespace);
    let mut last_renewed = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(s.renew_every).await;
        match try_acquire(&api, s).await {
            Ok(true) => last_renewed = tokio::time::Instant::now(),
            Ok(false) => {
                tracing::error!(lease = %s.name, "lost the lease to another replica");
                return;
            }
            Err(e) => {
                tracing::warn!(lease = %s.name, "cannot renew the lease: {e}");
                // Stop before the lease can expire and another replica take over.
                if last_renewed.elapsed() + s.renew_every >= s.duration {
                    tracing::error!(lease = %s.name, "could not renew the lease in time; stepping down");
                    return;
                }
            }
        }
    }
}

/// Gives the lease up (on shutdown), so a standby takes over at once instead of after it expires.
pub async fn release(client: &Client, s: &LeaseSettings) {
    let api: Api<Lease> = Api::namespaced(client.clone(), &s.namespace);
    let Ok(Some(mut lease)) = api.get_opt(&s.name).await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(s.identity.as_str()) {
        return;
    }
    spec.holder_identity = None;
    spec.renew_time = None;
    if let Err(e) = api.replace(&s.name, &PostParams::default(), &lease).await {
        tracing::warn!(lease = %s.name, "cannot release the lease: {e}");
    }
}
