//! The operator's HTTP endpoints: `/metrics` (Prometheus text), `/healthz` (the process serves) and
//! `/readyz` (the EpicExport cache is filled, or this replica is a standby waiting for the lease). The
//! JWK Set server serves the health pair and its own `/metrics` ([`health_and_metrics`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use super::metrics::Metrics;

/// `/metrics`, `/healthz` and `/readyz`.
pub fn router(metrics: Arc<Metrics>, ready: Arc<AtomicBool>) -> Router {
    health(ready).route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.encode(),
                )
            }
        }),
    )
}

/// `/metrics` with the text of `encode`, `/healthz` and `/readyz` (the JWK Set server's).
pub fn health_and_metrics(
    ready: Arc<AtomicBool>,
    encode: impl Fn() -> String + Clone + Send + Sync + 'static,
) -> Router {
    health(ready).route(
        "/metrics",
        get(move || {
            let text = encode();
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    text,
                )
            }
        }),
    )
}

/// `/healthz` (always ok) and `/readyz` (ok once `ready` is set).
pub fn health(ready: Arc<AtomicBool>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.load(Ordering::Relaxed);
                async move {
                    if ready {
                        (StatusCode::OK, "ready").into_response()
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "starting").into_response()
                    }
                }
            }),
        )
}
