//! The SMART Backend Services client assertion: a short-lived JWT signed with the app's private key.
//!
//! Building the header and claims is pure (the caller passes `now` and the `jti`); only `sign` touches
//! the key. Rules (SMART Backend Services, client authentication): `typ: JWT`, `kid` always, `jku`
//! when configured; `iss` = `sub` = client id, `aud` = the token URL exactly, `exp` 240 s ahead (Epic
//! rejects more than 300 s when the request arrives), a fresh `jti` per request, and no `iat`/`nbf` (a
//! fast client clock would put them in the future).

use serde::Serialize;

use super::keys::{SigningKey, b64};

/// Seconds between signing and `exp`. Well under Epic's 300 s ceiling, leaving room for clock skew.
pub const ASSERTION_LIFETIME_SECS: i64 = 240;

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Header<'a> {
    pub alg: &'a str,
    pub typ: &'static str,
    pub kid: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jku: Option<&'a str>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Claims<'a> {
    pub iss: &'a str,
    pub sub: &'a str,
    pub aud: &'a str,
    pub jti: &'a str,
    pub exp: i64,
}

/// Builds the claims for one token request. `now` is Unix seconds.
pub fn claims<'a>(client_id: &'a str, token_url: &'a str, jti: &'a str, now: i64) -> Claims<'a> {
    Claims {
        iss: client_id,
        sub: client_id,
        aud: token_url,
        jti,
        exp: now + ASSERTION_LIFETIME_SECS,
    }
}

/// Signs a compact JWS (`header.claims.signature`).
pub fn sign(
    key: &SigningKey,
    jku: Option<&str>,
    claims: &Claims<'_>,
) -> Result<String, serde_json::Error> {
    let header = Header {
        alg: key.algorithm().as_str(),
        typ: "JWT",
        kid: key.kid(),
        jku,
    };
    let h = b64(&serde_json::to_vec(&header)?);
    let c = b64(&serde_json::to_vec(claims)?);
    let signing_input = format!("{h}.{c}");
    let sig = key.sign(signing_input.as_bytes());
    Ok(format!("{signing_input}.{}", b64(&sig)))
}

/// A new random `jti` (UUID v4: 36 characters, well under Epic's 151).
pub fn new_jti() -> String {
    uuid::Uuid::new_v4().to_string()
}
