//! Finding the token endpoint from the FHIR base URL.
//!
//! `GET {base}/.well-known/smart-configuration` first (always JSON); servers older than Epic's August 2021
//! version only have the CapabilityStatement's `oauth-uris` extension at `{base}/metadata`. Relative
//! endpoint URLs are resolved against the base. Only `token_endpoint` is required.

use super::token::AuthError;

const OAUTH_URIS: &str = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris";

/// Discovers the token URL for `base_url`.
pub async fn token_url(http: &reqwest::Client, base_url: &str) -> Result<String, AuthError> {
    let base = base_url.trim_end_matches('/');
    let smart = format!("{base}/.well-known/smart-configuration");
    let first = match get_json(http, &smart).await {
        Ok(doc) => match doc.get("token_endpoint").and_then(|v| v.as_str()) {
            Some(t) => return resolve(base, t, &smart),
            None => "it has no token_endpoint".to_string(),
        },
        Err(e) => e.to_string(),
    };
    let metadata = format!("{base}/metadata");
    let second = match get_json(http, &metadata).await {
        Ok(doc) => match token_from_capability_statement(&doc) {
            Some(t) => return resolve(base, &t, &metadata),
            None => "it has no oauth-uris token extension".to_string(),
        },
        Err(e) => e.to_string(),
    };
    Err(AuthError::Discovery {
        url: smart,
        detail: format!("{first}; {metadata}: {second}"),
    })
}

/// Why one discovery document gave nothing.
#[derive(Debug, thiserror::Error)]
enum DocumentProblem {
    #[error("{0}")]
    Transport(String),
    #[error("HTTP {0}")]
    Status(u16),
    #[error(transparent)]
    Body(#[from] crate::http::body::BodyError),
    #[error("not JSON ({0})")]
    NotJson(&'static str),
}

async fn get_json(http: &reqwest::Client, url: &str) -> Result<serde_json::Value, DocumentProblem> {
    let resp = http
        .get(url)
        .header("Accept", "application/json, application/fhir+json")
        .send()
        .await
        .map_err(|e| DocumentProblem::Transport(crate::http::describe_transport(&e)))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(DocumentProblem::Status(status.as_u16()));
    }
    let body = crate::http::body::read_limited(resp, crate::http::body::MAX_DOCUMENT_BYTES).await?;
    serde_json::from_slice(&body)
        .map_err(|e| DocumentProblem::NotJson(crate::http::body::json_error_kind(&e)))
}

/// The `token` URI from `rest[].security.extension[oauth-uris]`.
pub fn token_from_capability_statement(doc: &serde_json::Value) -> Option<String> {
    doc.get("rest")?.as_array()?.iter().find_map(|rest| {
        rest.pointer("/security/extension")?
            .as_array()?
            .iter()
            .find_map(|ext| {
                if ext.get("url")?.as_str()? != OAUTH_URIS {
                    return None;
                }
                ext.get("extension")?.as_array()?.iter().find_map(|inner| {
                    (inner.get("url")?.as_str()? == "token")
                        .then(|| inner.get("valueUri")?.as_str().map(str::to_owned))?
                })
            })
    })
}

fn resolve(base: &str, endpoint: &str, from: &str) -> Result<String, AuthError> {
    let base_url = url::Url::parse(&format!("{base}/")).map_err(|e| AuthError::Discovery {
        url: from.to_owned(),
        detail: format!("the base URL is invalid: {e}"),
    })?;
    base_url
        .join(endpoint)
        .map(String::from)
        .map_err(|e| AuthError::Discovery {
            url: from.to_owned(),
            detail: format!("token_endpoint {endpoint:?} is not a URL: {e}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn capability_statement_oauth_uris() {
        let doc = json!({"resourceType": "CapabilityStatement", "rest": [{"security": {"extension": [{
            "url": OAUTH_URIS,
            "extension": [{"url": "authorize", "valueUri": "https://a/authorize"}, {"url": "token", "valueUri": "https://a/token"}]
        }]}}]});
        assert_eq!(
            token_from_capability_statement(&doc).as_deref(),
            Some("https://a/token")
        );
        assert_eq!(token_from_capability_statement(&json!({"rest": []})), None);
    }

    #[test]
    fn relative_endpoints_resolve_against_the_base() {
        assert_eq!(
            resolve("https://h/fhir/R4", "/oauth2/token", "x").unwrap(),
            "https://h/oauth2/token"
        );
        assert_eq!(
            resolve("https://h/fhir/R4", "token", "x").unwrap(),
            "https://h/fhir/R4/token"
        );
        assert_eq!(
            resolve("https://h/fhir/R4", "https://o/t", "x").unwrap(),
            "https://o/t"
        );
    }
}
