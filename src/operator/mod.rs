//! The Kubernetes side: the `EpicExport` custom resource (`crd`), the export Jobs built from it
//! (`job`, with the images they may run in `images`; the pod runs `crate::run::run_job`), the operator
//! that runs them on schedule (`controller`, with its `metrics`; it reads the key Secrets, laid out as
//! `key_secret` says, and publishes their public keys in the status), and the JWK Set endpoint serving
//! those public keys (`jwks`, a process of its own: `epic-export jwks-server`, which reads nothing but
//! EpicExports). Both processes build their EpicExport cache with `exports`.

pub mod controller;
pub mod crd;
pub mod exports;
pub mod http;
pub mod images;
pub mod job;
pub mod jwks;
pub mod key_secret;
pub mod lease;
pub mod metrics;

/// How `epic-export controller` runs.
#[derive(Clone, Debug)]
pub struct ControllerOptions {
    pub settings: controller::Settings,
    /// Where `/metrics`, `/healthz` and `/readyz` are served (`None`: not served).
    pub http_addr: Option<std::net::SocketAddr>,
    /// Take a Lease before acting (for more than one replica).
    pub leader_election: Option<lease::LeaseSettings>,
}

/// How `epic-export jwks-server` runs.
#[derive(Clone, Debug)]
pub struct JwksServerOptions {
    /// Where the JWK Set endpoint is served.
    pub addr: std::net::SocketAddr,
    /// Where `/healthz` and `/readyz` are served (`None`: not served).
    pub health_addr: Option<std::net::SocketAddr>,
    /// Serve only the EpicExports of this namespace (default: all).
    pub namespace: Option<String>,
    pub settings: jwks::JwksSettings,
}

/// Why `epic-export controller` or `epic-export jwks-server` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr} for {what}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("JWK Set endpoint stopped: {0}")]
    JwksStopped(#[source] std::io::Error),
    #[error(transparent)]
    Controller(#[from] controller::RunError),
}

/// Binds `addr` for `what`; returns the listener and the address it got.
async fn listen(
    addr: std::net::SocketAddr,
    what: &'static str,
) -> Result<(tokio::net::TcpListener, std::net::SocketAddr), Error> {
    let failed = |source| Error::Listen { addr, what, source };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(failed)?;
    let local = listener.local_addr().map_err(failed)?;
    Ok((listener, local))
}

/// Runs the JWK Set endpoint until `shutdown` completes (exit code 0).
pub async fn run_jwks_server(
    client: kube::Client,
    options: JwksServerOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<u8, Error> {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    let ready = Arc::new(AtomicBool::new(false));
    let metrics = Arc::new(jwks::JwksMetrics::default());
    let _health = match options.health_addr {
        Some(addr) => {
            let (listener, local) = listen(addr, "health and /metrics").await?;
            tracing::info!("health and metrics on http://{local}");
            let m = metrics.clone();
            let app = http::health_and_metrics(ready.clone(), move || m.encode());
            Some(crate::task::AbortOnDrop(tokio::spawn(async move {
                axum::serve(listener, app).await
            })))
        }
        None => None,
    };
    let (listener, local) = listen(options.addr, "the JWK Set endpoint").await?;
    tracing::info!("JWK Set endpoint on http://{local}/jwks/");
    tokio::select! {
        served = jwks::serve_with_metrics(client, options.namespace, listener, options.settings, ready, metrics) => {
            served.map_err(Error::JwksStopped)?;
        }
        _ = shutdown => {}
    }
    Ok(0)
}

/// Runs the operator until SIGTERM/Ctrl-C (exit 0) or until it loses its lease (exit 1).
pub async fn run_controller(
    client: kube::Client,
    options: ControllerOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<u8, Error> {
    use futures::FutureExt;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    let metrics = Arc::new(metrics::Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    if let Some(addr) = options.http_addr {
        let (listener, local) = listen(addr, "/metrics and health").await?;
        tracing::info!("metrics and health on http://{local}");
        let app = http::router(metrics.clone(), ready.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
    }
    let stop = shutdown.boxed().shared();
    if let Some(lease_settings) = &options.leader_election {
        // A standby is healthy and ready: it is waiting, as it should.
        ready.store(true, std::sync::atomic::Ordering::Relaxed);
        tokio::select! {
            _ = lease::acquire(&client, lease_settings) => {}
            _ = stop.clone() => return Ok(0),
        }
    }
    let (lost_tx, mut lost_rx) = tokio::sync::watch::channel(false);
    let holder = options.leader_election.clone().map(|lease_settings| {
        let client = client.clone();
        tokio::spawn(async move {
            lease::hold(&client, &lease_settings).await;
            let _ = lost_tx.send(true);
        })
    });
    let stop_controller = {
        let stop = stop.clone();
        async move {
            tokio::select! {
                _ = stop => {}
                Ok(_) = lost_rx.wait_for(|lost| *lost) => {}
            }
        }
        .boxed()
        .shared()
    };
    let lost = stop_controller.clone();
    metrics.leader.set(1);
    let ran = controller::run(
        client.clone(),
        options.settings,
        metrics.clone(),
        ready,
        stop_controller,
    )
    .await;
    metrics.leader.set(0);
    ran?;
    drop(lost);
    if let Some(holder) = holder {
        holder.abort();
        let _ = holder.await;
    }
    if let Some(lease_settings) = &options.leader_election {
        if stop.peek().is_none() {
            // Stopped without a shutdown request: the lease was lost.
            return Ok(1);
        }
        lease::release(&client, lease_settings).await;
    }
    Ok(0)
}
