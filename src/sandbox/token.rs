//! The sandbox's authorization side: SMART discovery and the token endpoint.
//!
//! Client assertions are checked with Epic's rules (protocol notes 1.3, 1.4 and 2.2): algorithm,
//! `typ`, `iss == sub ==` a registered client, `aud` exactly the token URL, `exp` at most 300 s
//! ahead, `nbf`/`iat` not in the future, `jti` not replayed, `jku` equal to the registered URL,
//! `kid` selecting one key of the right type, and a valid signature. Every failure answers the
//! same reason-less `invalid_client`, like Epic; the reason only goes to the sandbox's log.
//! Access tokens are opaque random strings kept in memory with their expiry.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};

use super::{ClientKeys, Shared};

/// Longest accepted assertion lifetime and look-ahead of `exp` (seconds).
const MAX_ASSERTION_LIFETIME: i64 = 300;
/// Clock leeway for `nbf`/`iat` (seconds).
const LEEWAY: i64 = 5;
/// Epic's longest accepted `jti`.
const MAX_JTI_LEN: usize = 151;
/// Epic's default and maximum JWK Set cache time.
const MAX_JWKS_CACHE: Duration = Duration::from_secs(29 * 3600);
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
const DEFAULT_SCOPE: &str = "system/*.read";

/// `GET {base}/.well-known/smart-configuration`.
pub(super) async fn smart_configuration(State(s): State<Arc<Shared>>) -> Response {
    Json(json!({
        "issuer": s.base_url(),
        "token_endpoint": s.token_url(),
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384", "RS256", "RS512", "ES256"],
        "capabilities": ["client-confidential-asymmetric", "permission-v1", "permission-v2"],
        "scopes_supported": ["system/*.read", "system/*.rs"],
        "code_challenge_methods_supported": ["S256"],
    }))
    .into_response()
}

fn oauth_error(error: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        [(axum::http::header::CACHE_CONTROL, "no-store")],
        Json(json!({"error": error, "error_description": null})),
    )
        .into_response()
}

/// `POST /oauth2/token` (form-encoded).
pub(super) async fn token_endpoint(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    let mut grant_type = None;
    let mut assertion_type = None;
    let mut assertion = None;
    let mut scope = None;
    for (k, v) in url::form_urlencoded::parse(&body) {
        match k.as_ref() {
            "grant_type" => grant_type = Some(v.into_owned()),
            "client_assertion_type" => assertion_type = Some(v.into_owned()),
            "client_assertion" => assertion = Some(v.into_owned()),
            "scope" => scope = Some(v.into_owned()),
            _ => {}
        }
    }
    if grant_type.as_deref() != Some("client_credentials") {
        tracing::warn!("token request rejected: grant_type is not client_credentials");
        s.lock().stats.token_rejections += 1;
        return oauth_error("unsupported_grant_type");
    }
    if assertion_type.as_deref() != Some(JWT_BEARER) {
        tracing::warn!("token request rejected: client_assertion_type is not jwt-bearer");
        s.lock().stats.token_rejections += 1;
        return oauth_error("invalid_request");
    }
    let Some(assertion) = assertion.filter(|a| !a.is_empty()) else {
        tracing::warn!("token request rejected: client_assertion is missing");
        s.lock().stats.token_rejections += 1;
        return oauth_error("invalid_request");
    };
    match verify_assertion(&s, &assertion).await {
        Ok(client_id) => {
            let token = format!(
                "{}{}",
                uuid::Uuid::new_v4().simple(),
                uuid::Uuid::new_v4().simple()
            );
            let lifetime = s.opts.token_lifetime;
            {
                let mut inner = s.lock();
                let now = Instant::now();
                inner.tokens.retain(|_, (exp, _)| *exp > now);
                inner
                    .tokens
                    .insert(token.clone(), (now + lifetime, client_id.clone()));
                inner.stats.tokens_issued += 1;
            }
            tracing::info!(client_id = %client_id, "access token issued");
            let scope = scope
                .filter(|s| !s.trim().is_empty())
                .unwrap_or_else(|| DEFAULT_SCOPE.to_string());
            (
                [(axum::http::header::CACHE_CONTROL, "no-store")],
                Json(json!({
                    "access_token": token,
                    "token_type": "bearer",
                    "expires_in": lifetime.as_secs(),
                    "scope": scope,
                })),
            )
                .into_response()
        }
        Err(Rejected(reason)) => {
            tracing::warn!("assertion rejected: {reason}");
            s.lock().stats.token_rejections += 1;
            oauth_error("invalid_client")
        }
    }
}

/// Why an assertion was refused (for the log only; clients just see `invalid_client`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Rejected(pub(super) String);

fn reject<T>(reason: impl Into<String>) -> Result<T, Rejected> {
    Err(Rejected(reason.into()))
}

fn now_unix() -> i64 {
    jiff::Timestamp::now().as_second()
}

/// Checks a client assertion; returns the client id on success.
pub(super) async fn verify_assertion(s: &Shared, jwt: &str) -> Result<String, Rejected> {
    let Ok(header) = jsonwebtoken::decode_header(jwt) else {
        return reject("the JWT header is malformed or its alg is unknown");
    };
    let family_is_rsa = match header.alg {
        Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => true,
        Algorithm::ES256 | Algorithm::ES384 => false,
        other => return reject(format!("alg {other:?} is not accepted")),
    };
    if let Some(typ) = &header.typ
        && !typ.eq_ignore_ascii_case("JWT")
    {
        return reject("typ is present but not JWT");
    }
    let Ok(claims) = jsonwebtoken::dangerous::insecure_decode::<Value>(jwt).map(|t| t.claims)
    else {
        return reject("the JWT claims are malformed");
    };
    let now = now_unix();
    let checked = check_claims(&claims, &s.token_url(), now)?;

    let keys = s.lock().clients.get(&checked.client_id).cloned();
    let Some(keys) = keys else {
        return reject("iss is not a registered client id");
    };
    match (&header.jku, &keys) {
        (Some(jku), ClientKeys::JwksUrl(url)) if jku != url => {
            return reject("jku is not the registered JWK Set URL");
        }
        (Some(_), ClientKeys::Jwks(_)) => {
            return reject("jku is present but the client registered static keys");
        }
        _ => {}
    }
    {
        let inner = s.lock();
        let key = (checked.client_id.clone(), checked.jti.clone());
        if inner.seen_jti.get(&key).is_some_and(|exp| *exp >= now) {
            return reject("jti was already used by this client");
        }
    }

    let kid = header.kid.as_deref();
    match &keys {
        ClientKeys::Jwks(set) => verify_with(set, jwt, header.alg, family_is_rsa, kid)?,
        ClientKeys::JwksUrl(url) => {
            let (set, mut fresh) = match cached_jwks(s, url) {
                Some(set) => (set, false),
                None => (fetch_jwks(s, url).await?, true),
            };
            let mut set = set;
            loop {
                match verify_with(&set, jwt, header.alg, family_is_rsa, kid) {
                    Ok(()) => break,
                    // Keys may have rotated: refetch once per presented JWT.
                    Err(_) if !fresh => {
                        set = fetch_jwks(s, url).await?;
                        fresh = true;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }

    let mut inner = s.lock();
    inner.seen_jti.retain(|_, exp| *exp >= now);
    let key = (checked.client_id.clone(), checked.jti);
    if inner.seen_jti.contains_key(&key) {
        // Two requests raced with the same jti; only the first wins.
        return reject("jti was already used by this client");
    }
    inner.seen_jti.insert(key, checked.exp);
    Ok(checked.client_id)
}

/// The claims that passed [`check_claims`].
#[derive(Debug)]
pub(super) struct CheckedClaims {
    pub(super) client_id: String,
    pub(super) jti: String,
    pub(super) exp: i64,
}

/// The time and identity rules on the claims (no key material involved).
pub(super) fn check_claims(
    claims: &Value,
    token_url: &str,
    now: i64,
) -> Result<CheckedClaims, Rejected> {
    let Some(iss) = claims.get("iss").and_then(Value::as_str) else {
        return reject("iss is missing or not a string");
    };
    let Some(sub) = claims.get("sub").and_then(Value::as_str) else {
        return reject("sub is missing or not a string");
    };
    if iss != sub {
        return reject("iss and sub differ");
    }
    let aud_ok = match claims.get("aud") {
        Some(Value::String(a)) => a == token_url,
        Some(Value::Array(a)) => a.len() == 1 && a[0].as_str() == Some(token_url),
        _ => false,
    };
    if !aud_ok {
        return reject("aud is not the token URL");
    }
    let exp = match claims.get("exp") {
        None => return reject("exp is missing"),
        Some(v) => match v.as_i64() {
            Some(e) => e,
            None => return reject("exp is not an integer"),
        },
    };
    if exp <= now {
        return reject("exp is in the past");
    }
    if exp - now > MAX_ASSERTION_LIFETIME {
        return reject("exp is more than 300 s ahead");
    }
    for name in ["nbf", "iat"] {
        let Some(v) = claims.get(name) else { continue };
        let Some(t) = v.as_i64() else {
            return reject(format!("{name} is not an integer"));
        };
        if t > now + LEEWAY {
            return reject(format!("{name} is in the future"));
        }
        if t > exp {
            return reject(format!("{name} is after exp"));
        }
        if exp - t > MAX_ASSERTION_LIFETIME {
            return reject(format!("exp - {name} is more than 300 s"));
        }
    }
    let jti = match claims.get("jti") {
        None => return reject("jti is missing"),
        Some(Value::String(j)) if j.is_empty() => return reject("jti is empty"),
        Some(Value::String(j)) if j.chars().count() > MAX_JTI_LEN => {
            return reject("jti is longer than 151 characters");
        }
        Some(Value::String(j)) => j.clone(),
        Some(_) => return reject("jti is not a string"),
    };
    Ok(CheckedClaims {
        client_id: iss.to_string(),
        jti,
        exp,
    })
}

/// Picks the candidate keys (right `kty`; the one `kid` if given) and checks the signature.
fn verify_with(
    set: &JwkSet,
    jwt: &str,
    alg: Algorithm,
    rsa: bool,
    kid: Option<&str>,
) -> Result<(), Rejected> {
    let fits = |k: &&Jwk| match &k.algorithm {
        AlgorithmParameters::RSA(_) => rsa,
        AlgorithmParameters::EllipticCurve(_) => !rsa,
        _ => false,
    };
    let candidates: Vec<&Jwk> = set
        .keys
        .iter()
        .filter(fits)
        .filter(|k| kid.is_none_or(|kid| k.common.key_id.as_deref() == Some(kid)))
        .collect();
    match (kid, candidates.len()) {
        (Some(_), 0) => return reject("no key of the alg's type has this kid"),
        (Some(_), n) if n > 1 => return reject("more than one key has this kid"),
        (None, 0) => return reject("the client has no key of the alg's type"),
        _ => {}
    }
    let mut validation = Validation::new(alg);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    for jwk in candidates {
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            continue;
        };
        if jsonwebtoken::decode::<Value>(jwt, &key, &validation).is_ok() {
            return Ok(());
        }
    }
    reject("the signature does not verify with the client's keys")
}

fn cached_jwks(s: &Shared, url: &str) -> Option<JwkSet> {
    let inner = s.lock();
    let (set, until) = inner.jwks_cache.get(url)?;
    (*until > Instant::now()).then(|| set.clone())
}

/// Fetches a JWK Set URL and caches it as its `Cache-Control` allows.
async fn fetch_jwks(s: &Shared, url: &str) -> Result<JwkSet, Rejected> {
    let resp = match s.http.get(url).send().await {
        Ok(r) => r,
        Err(e) => return reject(format!("the JWK Set URL could not be fetched: {e}")),
    };
    if !resp.status().is_success() {
        return reject(format!("the JWK Set URL answered {}", resp.status()));
    }
    let ttl = cache_ttl(
        resp.headers()
            .get(reqwest::header::CACHE_CONTROL)
            .and_then(|v| v.to_str().ok()),
    );
    let set: JwkSet = match resp.json().await {
        Ok(set) => set,
        Err(_) => return reject("the JWK Set URL did not return a JWK Set"),
    };
    let mut inner = s.lock();
    match ttl {
        Some(ttl) => {
            inner
                .jwks_cache
                .insert(url.to_string(), (set.clone(), Instant::now() + ttl));
        }
        None => {
            inner.jwks_cache.remove(url);
        }
    }
    Ok(set)
}

/// How long a JWK Set may be cached: `None` for `no-store`/`no-cache`/`max-age=0`, else
/// `max-age` capped at 29 h, else 29 h.
pub(super) fn cache_ttl(cache_control: Option<&str>) -> Option<Duration> {
    let Some(cc) = cache_control else {
        return Some(MAX_JWKS_CACHE);
    };
    let mut ttl = MAX_JWKS_CACHE;
    for directive in cc.split(',').map(str::trim) {
        let lower = directive.to_ascii_lowercase();
        if lower == "no-store" || lower == "no-cache" {
            return None;
        }
        if let Some(secs) = lower.strip_prefix("max-age=") {
            match secs.trim_matches('"').parse::<u64>() {
                Ok(0) => return None,
                Ok(n) => ttl = Duration::from_secs(n).min(MAX_JWKS_CACHE),
                Err(_) => {}
            }
        }
    }
    Some(ttl)
}
