//! The sandbox's attachment downloads: `GET {base}/Binary/{id}` (bearer token) and, with
//! `SandboxOptions::attachments_on_storage`, `GET /notes/{id}` on the storage origin (no token).
//!
//! Content negotiation follows Epic: when the `Accept` header names one of the Binary's content
//! types (parameters and q-values ignored; `*/*` does not count), the raw bytes are sent with
//! that `Content-Type` and a `Content-Length`; otherwise (`application/fhir+json`,
//! `application/json`, `*/*` or no `Accept`) the answer is a FHIR Binary resource whose `data`
//! is the base64 of the default representation. The storage origin always sends raw bytes: the
//! type named by `Accept`, else the default one. The bytes come from `Dataset::binary`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::json;

use super::fhir::{error, fhir, gate};
use super::{BinaryDoc, Shared};

/// Note attachments on the storage origin are at `/{STORAGE_NOTES_PATH}/{binary id}`.
pub(super) const STORAGE_NOTES_PATH: &str = "notes";

/// The first media range of `Accept` that is one of `doc`'s content types.
fn negotiated(doc: &BinaryDoc, headers: &HeaderMap) -> Option<&'static str> {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|range| doc.representation(range).map(|(t, _)| t))
}

fn raw(doc: &BinaryDoc, content_type: &str) -> Response {
    let Some((content_type, bytes)) = doc.representation(content_type) else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let len = bytes.len();
    let mut resp = (StatusCode::OK, bytes.to_vec()).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    resp
}

/// `GET {base}/Binary/{id}`.
pub(super) async fn read(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(resp) = gate(&s, &headers).await {
        return resp;
    }
    s.lock().stats.binary_reads += 1;
    let Some(doc) = s.dataset.binary(&id) else {
        return error(
            StatusCode::NOT_FOUND,
            "not-found",
            &format!("Binary/{id} was not found."),
        );
    };
    if let Some(content_type) = negotiated(&doc, &headers) {
        s.lock().stats.binary_reads_raw += 1;
        return raw(&doc, content_type);
    }
    let content_type = doc.default_content_type();
    let data = doc
        .representation(content_type)
        .map(|(_, bytes)| base64::engine::general_purpose::STANDARD.encode(bytes))
        .unwrap_or_default();
    fhir(
        StatusCode::OK,
        &json!({
            "resourceType": "Binary",
            "id": doc.id,
            "contentType": content_type,
            "data": data,
        }),
    )
}

/// `GET /notes/{id}` on the storage origin: raw attachment bytes, no token.
pub(super) async fn storage_note(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    {
        let mut inner = s.lock();
        inner.stats.storage_requests += 1;
        if headers.contains_key(header::AUTHORIZATION) {
            inner.stats.storage_requests_with_authorization += 1;
        }
    }
    let doc = s
        .opts
        .attachments_on_storage
        .then(|| s.dataset.binary(&id))
        .flatten();
    let Some(doc) = doc else {
        return error(
            StatusCode::NOT_FOUND,
            "not-found",
            "No such file on the storage origin.",
        );
    };
    s.lock().stats.storage_attachment_downloads += 1;
    let content_type = negotiated(&doc, &headers).unwrap_or(doc.default_content_type());
    raw(&doc, content_type)
}
