//! The EpicExport cache of a process: the one way to build the EpicExport reflector (its watch, its
//! scope), used by the controller (`controller::run`) and by the JWK Set endpoint (`jwks::serve`).
//! They run as processes of their own (`epic-export controller`, `epic-export jwks-server`, with
//! different RBAC), so each process holds exactly one such reflector.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::Stream;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};

use super::crd::EpicExport;

/// `Api` for the namespace `namespace`, or for all namespaces.
pub fn api<K>(client: Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    }
}

/// The watch config of the EpicExport cache.
fn watch_config() -> watcher::Config {
    watcher::Config::default().any_semantic()
}

/// The EpicExport cache of `namespace` (or all): the store, and the watch stream (with the default
/// backoff) that fills it as it is polled, yielding every EpicExport added or changed.
pub fn reflector(
    client: Client,
    namespace: Option<&str>,
) -> (
    Store<EpicExport>,
    impl Stream<Item = Result<EpicExport, watcher::Error>> + Send + 'static,
) {
    let (reader, writer) = reflector::store();
    let stream = watcher(api::<EpicExport>(client, namespace), watch_config())
        .default_backoff()
        .reflect(writer)
        .applied_objects();
    (reader, stream)
}

/// Sets `ready` once `store` was filled by its first list; logs it with `what`.
pub async fn mark_ready(store: Store<EpicExport>, ready: Arc<AtomicBool>, what: &str) {
    // Polled again every half second: kube's store readiness wakes only the last of several
    // concurrent waiters, but once ready it stays ready.
    while tokio::time::timeout(Duration::from_millis(500), store.wait_until_ready())
        .await
        .is_err()
    {}
    ready.store(true, Ordering::Relaxed);
    tracing::info!("{what}EpicExport cache ready");
}
