//! Checking a JWK Set URL (`auth.jwksUrl`, sent as the assertion's `jku`) the way Epic will use it:
//! fetch it without credentials, parse it as a JWK Set, and confirm that the key we sign with is
//! published under our `kid` (SMART Backend Services: the server fetches the JWK Set URL and picks
//! the key by `kid`).
//!
//! [`fetch_and_compare`] does one GET (`Accept: application/json`, [`FETCH_TIMEOUT`], its own HTTP
//! client, so no access token or other credential can ever be sent to the URL); [`compare`] is the
//! pure part: it fails on a private member in any published key, a missing `kid`, a different public
//! key or a disagreeing `alg` under our `kid`, and warns about plain http, `use` other than `sig`,
//! duplicate kids, redirects and `Cache-Control: no-store`. Reasons name the URL and the fix, and
//! never include key material beyond public key ids.

use std::fmt::Write as _;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::Value;

use super::keys::SigningKey;

/// How long the whole fetch may take.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// The most we read of a JWK Set (a real one is a few kilobytes).
/// JWK members that only a private (or symmetric) key has.
const PRIVATE_MEMBERS: [&str; 8] = ["d", "p", "q", "dp", "dq", "qi", "oth", "k"];

/// Why the JWK Set URL would not let Epic verify our assertions.
#[derive(Debug, thiserror::Error)]
pub enum JwksProblem {
    #[error(
        "cannot reach the JWK Set URL {url}: {message}. Epic requires it to be public, stable, unauthenticated and responding: check the URL in auth.jwksUrl and that the server is up"
    )]
    Unreachable { url: String, message: String },
    #[error(
        "the JWK Set URL {url} answered HTTP {status}; it must answer 200 with the JWK Set and no authentication: publish the output of `epic-export jwks --key FILE` there"
    )]
    Status { url: String, status: u16 },
    #[error(
        "the JWK Set URL {url} did not send a JSON JWK Set ({detail}); publish the output of `epic-export jwks --key FILE` there (`{{\"keys\": [...]}}`)"
    )]
    NotJwks { url: String, detail: String },
    #[error(
        "your JWK Set URL {url} publishes a private key (member {member:?} of the key with kid {kid}): remove it and rotate this key (`epic-export keygen`), since anyone could have copied it; publish only `epic-export jwks --key FILE` output"
    )]
    PrivateKey {
        url: String,
        kid: String,
        member: String,
    },
    #[error(
        "the kid we sign with ({kid}) matches no key in the JWK Set at {url} (its kids: {kids}), so Epic will answer invalid_client: add the output of `{publish}` to it (Epic may keep the old set cached for up to 29 h, or as Cache-Control says)"
    )]
    MissingKid {
        url: String,
        kid: String,
        kids: String,
        publish: String,
    },
    #[error(
        "the JWK Set URL {url} publishes another key under our kid {kid} ({detail}), so our signatures will not verify: publish `{publish}` there, or point auth.privateKeyFile at the key it publishes"
    )]
    DifferentKey {
        url: String,
        kid: String,
        detail: String,
        publish: String,
    },
    #[error(
        "the key with our kid {kid} at {url} says alg {published}, but we sign with {ours}: set auth.algorithm to {published}, or publish the key with alg {ours} (or without alg)"
    )]
    AlgMismatch {
        url: String,
        kid: String,
        published: String,
        ours: String,
    },
}

/// What a good JWK Set URL looks like, plus anything worth a warning.
#[derive(Debug, Default)]
pub struct JwksFound {
    /// Number of keys in the set.
    pub keys: usize,
    /// The `Cache-Control` header, if sent.
    pub cache_control: Option<String>,
    pub warnings: Vec<String>,
}

/// The result of a JWK Set URL check: `Ok` with details, or the problem; warnings either way.
#[derive(Debug)]
pub struct JwksOutcome {
    pub url: String,
    pub kid: String,
    pub result: Result<JwksFound, JwksProblem>,
    pub warnings: Vec<String>,
}

impl JwksOutcome {
    pub fn is_ok(&self) -> bool {
        self.result.is_ok()
    }

    /// The report lines of `epic-export check`: `jwks: ok (...)` or `jwks: FAILED` and the reason,
    /// then `jwks: warning: ...` lines.
    pub fn render(&self) -> String {
        let mut out = String::new();
        match &self.result {
            Ok(found) => {
                let cache = match &found.cache_control {
                    Some(cc) => format!("Cache-Control {cc}"),
                    None => "no Cache-Control: Epic caches it up to 29 h".into(),
                };
                let _ = writeln!(
                    out,
                    "jwks: ok ({} has kid {}, {} key{}, {cache})",
                    self.url,
                    self.kid,
                    found.keys,
                    if found.keys == 1 { "" } else { "s" }
                );
            }
            Err(e) => {
                let _ = writeln!(out, "jwks: FAILED\n{e}");
            }
        }
        let found_warnings = self.result.as_ref().map(|f| &f.warnings[..]).unwrap_or(&[]);
        for w in self.warnings.iter().chain(found_warnings) {
            let _ = writeln!(out, "jwks: warning: {w}");
        }
        out
    }
}

/// The HTTP client for the check: its own, with no default headers, so no credential is sent.
fn client() -> reqwest::Client {
    use crate::http::{Redirects, Timeout};
    crate::http::client(Timeout::Total(FETCH_TIMEOUT), Redirects::Anywhere)
}

/// Fetches `url` and checks that `key` (loaded from `key_file`) is published there under its kid.
pub async fn fetch_and_compare(url: &str, key: &SigningKey, key_file: &str) -> JwksOutcome {
    let mut warnings = Vec::new();
    if url
        .get(..7)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("http://"))
    {
        warnings.push(format!(
            "{url} is plain http: Epic requires TLS (https://) for a JWK Set URL; http only works with the built-in sandbox"
        ));
    }
    let result = fetch(url, &mut warnings)
        .await
        .and_then(|(body, cache_control)| {
            let set: Value = serde_json::from_slice(&body).map_err(|e| JwksProblem::NotJwks {
                url: url.to_owned(),
                detail: format!("not JSON: {e}"),
            })?;
            let mut found = compare(url, &set, key, key_file)?;
            if let Some(cc) = &cache_control
                && cc.to_ascii_lowercase().contains("no-store")
            {
                found.warnings.push(format!(
                    "Cache-Control {cc} makes Epic fetch the set for every token request; Epic advises it for development only"
                ));
            }
            found.cache_control = cache_control;
            Ok(found)
        });
    JwksOutcome {
        url: url.to_owned(),
        kid: key.kid().to_owned(),
        result,
        warnings,
    }
}

async fn fetch(
    url: &str,
    warnings: &mut Vec<String>,
) -> Result<(Vec<u8>, Option<String>), JwksProblem> {
    let unreachable = |message: String| JwksProblem::Unreachable {
        url: url.to_owned(),
        message,
    };
    let resp = client()
        .get(url)
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| unreachable(crate::http::describe_transport(&e)))?;
    if url::Url::parse(url).ok().as_ref() != Some(resp.url()) {
        warnings.push(format!(
            "{url} redirects to {}: register the final URL, since Epic may not follow redirects",
            resp.url()
        ));
    }
    let status = resp.status().as_u16();
    if !(200..300).contains(&status) {
        return Err(JwksProblem::Status {
            url: url.to_owned(),
            status,
        });
    }
    let cache_control = resp
        .headers()
        .get(reqwest::header::CACHE_CONTROL)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = crate::http::body::read_limited(resp, crate::http::body::MAX_DOCUMENT_BYTES)
        .await
        .map_err(|e| match e {
            crate::http::body::BodyError::TooLarge { .. } => JwksProblem::NotJwks {
                url: url.to_owned(),
                detail: format!(
                    "the answer is larger than {} KiB",
                    crate::http::body::MAX_DOCUMENT_BYTES / 1024
                ),
            },
            crate::http::body::BodyError::Transport(m) => unreachable(m),
        })?
        .to_vec();
    Ok((body, cache_control))
}

/// Checks a parsed JWK Set against `key`. Pure; `url` and `key_file` only appear in messages.
pub fn compare(
    url: &str,
    set: &Value,
    key: &SigningKey,
    key_file: &str,
) -> Result<JwksFound, JwksProblem> {
    let not_jwks = |detail: &str| JwksProblem::NotJwks {
        url: url.to_owned(),
        detail: detail.to_owned(),
    };
    let keys = set
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| not_jwks("no \"keys\" array"))?;
    let kid_of = |k: &Value| k.get("kid").and_then(Value::as_str).map(str::to_owned);
    // A private member anywhere is the worst news: report it first, whichever key it is in.
    for k in keys {
        if let Some(obj) = k.as_object()
            && let Some(member) = PRIVATE_MEMBERS.iter().find(|m| obj.contains_key(**m))
        {
            return Err(JwksProblem::PrivateKey {
                url: url.to_owned(),
                kid: kid_of(k).unwrap_or_else(|| "(none)".into()),
                member: (*member).to_owned(),
            });
        }
    }
    let ours = key.public_jwk();
    let kid = key.kid();
    let same_kid: Vec<&Value> = keys
        .iter()
        .filter(|k| kid_of(k).as_deref() == Some(kid))
        .collect();
    if same_kid.is_empty() {
        let kids: Vec<String> = keys
            .iter()
            .map(|k| kid_of(k).unwrap_or_else(|| "(a key without kid)".into()))
            .collect();
        return Err(JwksProblem::MissingKid {
            url: url.to_owned(),
            kid: kid.to_owned(),
            kids: if kids.is_empty() {
                "none, the set is empty".into()
            } else {
                kids.join(", ")
            },
            publish: publish_command(key, key_file),
        });
    }
    let mut warnings = Vec::new();
    if same_kid.len() > 1 {
        warnings.push(format!(
            "{} keys share our kid {kid}; make each kid unique so a verifier does not have to try them all",
            same_kid.len()
        ));
    }
    let mut first_difference = None;
    let mut matched = None;
    for k in &same_kid {
        match public_difference(k, &ours) {
            None => {
                matched = Some(*k);
                break;
            }
            Some(d) => {
                first_difference.get_or_insert(d);
            }
        }
    }
    let Some(published) = matched else {
        return Err(JwksProblem::DifferentKey {
            url: url.to_owned(),
            kid: kid.to_owned(),
            detail: first_difference.unwrap_or_default(),
            publish: publish_command(key, key_file),
        });
    };
    let alg = key.algorithm().as_str();
    if let Some(published_alg) = published.get("alg").and_then(Value::as_str)
        && published_alg != alg
    {
        return Err(JwksProblem::AlgMismatch {
            url: url.to_owned(),
            kid: kid.to_owned(),
            published: published_alg.to_owned(),
            ours: alg.to_owned(),
        });
    }
    match published.get("use").and_then(Value::as_str) {
        None | Some("sig") => {}
        Some(other) => warnings.push(format!(
            "the key with our kid {kid} says use {other:?}; a signing key should say \"sig\" (or nothing), or a verifier may skip it"
        )),
    }
    if let Some(ops) = published.get("key_ops").and_then(Value::as_array)
        && !ops.iter().any(|o| o == "verify")
    {
        warnings.push(format!(
            "the key with our kid {kid} has key_ops without \"verify\"; a verifier may skip it"
        ));
    }
    Ok(JwksFound {
        keys: keys.len(),
        cache_control: None,
        warnings,
    })
}

/// The command that prints the JWK Set entry of `key` (with `--kid` when it is not the thumbprint).
fn publish_command(key: &SigningKey, key_file: &str) -> String {
    if key.kid() == key.thumbprint() {
        format!("epic-export jwks --key {key_file}")
    } else {
        format!("epic-export jwks --key {key_file} --kid {}", key.kid())
    }
}

/// `None` when `published` holds the same public key as `ours`, else what differs (no key material).
fn public_difference(published: &Value, ours: &Value) -> Option<String> {
    let s = |v: &Value, m: &str| v.get(m).and_then(Value::as_str).map(str::to_owned);
    let kty = s(published, "kty");
    let our_kty = s(ours, "kty");
    if kty != our_kty {
        return Some(format!(
            "kty {} where our key is {}",
            kty.as_deref().unwrap_or("missing"),
            our_kty.as_deref().unwrap_or("?")
        ));
    }
    let members: &[&str] = if our_kty.as_deref() == Some("RSA") {
        &["n", "e"]
    } else {
        if s(published, "crv") != s(ours, "crv") {
            return Some(format!(
                "curve {} where our key is {}",
                s(published, "crv").as_deref().unwrap_or("missing"),
                s(ours, "crv").as_deref().unwrap_or("?")
            ));
        }
        &["x", "y"]
    };
    for m in members {
        // Compare the numbers, not the text: some tools keep a leading zero byte in `n` or `e`.
        let decode = |v: &Value| {
            s(v, m).and_then(|t| {
                URL_SAFE_NO_PAD
                    .decode(t.trim_end_matches('='))
                    .ok()
                    .map(|b| {
                        let start = b.iter().position(|x| *x != 0).unwrap_or(b.len());
                        b[start..].to_vec()
                    })
            })
        };
        match decode(published) {
            None => return Some(format!("member {m:?} is missing or not base64url")),
            Some(p) if Some(&p) != decode(ours).as_ref() => {
                return Some(format!("a different public key: {m:?} differs"));
            }
            Some(_) => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Algorithm;
    use serde_json::json;

    const URL: &str = "https://keys.example.org/jwks.json";

    fn set(keys: Vec<Value>) -> Value {
        json!({ "keys": keys })
    }

    #[test]
    fn finds_our_key_among_others() {
        let ours = SigningKey::generate(Algorithm::ES384).unwrap();
        let other = SigningKey::generate(Algorithm::ES256).unwrap();
        let found = compare(
            URL,
            &set(vec![other.public_jwk(), ours.public_jwk()]),
            &ours,
            "k.pem",
        )
        .unwrap();
        assert_eq!(found.keys, 2);
        assert!(found.warnings.is_empty());
    }

    #[test]
    fn leading_zero_and_padding_still_match_and_use_enc_warns() {
        let ours = SigningKey::generate(Algorithm::RS384).unwrap();
        let mut jwk = ours.public_jwk();
        let n = URL_SAFE_NO_PAD.decode(jwk["n"].as_str().unwrap()).unwrap();
        let mut padded = vec![0u8];
        padded.extend(n);
        jwk["n"] = json!(base64::engine::general_purpose::URL_SAFE.encode(padded));
        jwk["use"] = json!("enc");
        let found = compare(URL, &set(vec![jwk]), &ours, "k.pem").unwrap();
        assert!(
            found.warnings[0].contains("use \"enc\""),
            "{:?}",
            found.warnings
        );
    }

    #[test]
    fn problems_are_named() {
        let ours = SigningKey::generate(Algorithm::ES384).unwrap();
        let other = SigningKey::generate(Algorithm::ES384).unwrap();
        let missing = compare(URL, &set(vec![other.public_jwk()]), &ours, "k.pem").unwrap_err();
        assert!(matches!(&missing, JwksProblem::MissingKid { kids, .. } if kids == other.kid()));

        let mut impostor = other.public_jwk();
        impostor["kid"] = json!(ours.kid());
        let different = compare(URL, &set(vec![impostor]), &ours, "k.pem").unwrap_err();
        assert!(matches!(different, JwksProblem::DifferentKey { .. }));

        let mut wrong_alg = ours.public_jwk();
        wrong_alg["alg"] = json!("ES256");
        let alg = compare(URL, &set(vec![wrong_alg]), &ours, "k.pem").unwrap_err();
        assert!(alg.to_string().contains("auth.algorithm to ES256"), "{alg}");

        let mut leaked = other.public_jwk();
        leaked["d"] = json!("secret-ish");
        let private =
            compare(URL, &set(vec![ours.public_jwk(), leaked]), &ours, "k.pem").unwrap_err();
        let text = private.to_string();
        assert!(text.contains("publishes a private key") && !text.contains("secret-ish"));

        for bad in [json!({}), json!({"keys": 3}), json!([1])] {
            assert!(matches!(
                compare(URL, &bad, &ours, "k.pem"),
                Err(JwksProblem::NotJwks { .. })
            ));
        }
        let empty = compare(URL, &set(vec![]), &ours, "k.pem").unwrap_err();
        assert!(empty.to_string().contains("the set is empty"));

        // With auth.keyId the fix command carries the kid, since the default would be the thumbprint.
        let pem = ours.to_pkcs8_pem().unwrap();
        let named = SigningKey::from_pem(
            pem.as_bytes(),
            std::path::Path::new("k.pem"),
            None,
            Some("my-key-1".into()),
        )
        .unwrap();
        let missing = compare(URL, &set(vec![ours.public_jwk()]), &named, "k.pem").unwrap_err();
        assert!(
            missing
                .to_string()
                .contains("`epic-export jwks --key k.pem --kid my-key-1`"),
            "{missing}"
        );
        assert!(compare(URL, &set(vec![named.public_jwk()]), &named, "k.pem").is_ok());
    }
}
