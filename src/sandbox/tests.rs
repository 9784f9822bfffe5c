//! Tests of the sandbox: the synthetic data set, then the server over real loopback sockets
//! (`Sandbox::start` + reqwest), with assertions signed by freshly generated RSA and EC keys.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lc_rs::encoding::AsDer;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use super::*;

// ---------- keys and assertions ----------

struct TestKey {
    key: EncodingKey,
    jwk: Jwk,
    alg: Algorithm,
}

fn rsa_key(kid: &str) -> TestKey {
    let pair =
        aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("rsa keygen");
    let der = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&pair).expect("pkcs8");
    let pem = pem::encode(&pem::Pem::new("PRIVATE KEY", der.as_ref().to_vec()));
    let key = EncodingKey::from_rsa_pem(pem.as_bytes()).expect("rsa pem");
    let mut jwk = Jwk::from_encoding_key(&key, Algorithm::RS384).expect("rsa jwk");
    jwk.common.key_id = Some(kid.to_string());
    TestKey {
        key,
        jwk,
        alg: Algorithm::RS384,
    }
}

fn ec_key(kid: &str) -> TestKey {
    let pair = aws_lc_rs::signature::EcdsaKeyPair::generate(
        &aws_lc_rs::signature::ECDSA_P384_SHA384_FIXED_SIGNING,
    )
    .expect("ec keygen");
    let der = pair.to_pkcs8v1().expect("pkcs8");
    let key = EncodingKey::from_ec_der(der.as_ref());
    let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES384).expect("ec jwk");
    jwk.common.key_id = Some(kid.to_string());
    TestKey {
        key,
        jwk,
        alg: Algorithm::ES384,
    }
}

fn jwks(keys: &[&TestKey]) -> JwkSet {
    JwkSet {
        keys: keys.iter().map(|k| k.jwk.clone()).collect(),
    }
}

fn now() -> i64 {
    jiff::Timestamp::now().as_second()
}

fn claims(client: &str, aud: &str) -> Value {
    json!({
        "iss": client,
        "sub": client,
        "aud": aud,
        "exp": now() + 240,
        "jti": uuid::Uuid::new_v4().to_string(),
    })
}

fn sign(key: &TestKey, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(key.alg);
    header.typ = Some("JWT".into());
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, &key.key).expect("sign")
}

async fn token_request(sb: &Sandbox, assertion: &str) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(sb.token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion),
            ("scope", "system/Patient.rs system/Observation.rs"),
        ])
        .send()
        .await
        .expect("token request");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("token json"))
}

/// A sandbox with one client (`test-client`, one RS384 key `k1`) and a token for it.
async fn started(opts: SandboxOptions) -> (Sandbox, String) {
    let sb = Sandbox::start(opts).await.expect("start");
    let key = rsa_key("k1");
    sb.register_client(ClientRegistration {
        client_id: "test-client".into(),
        keys: ClientKeys::Jwks(jwks(&[&key])),
    });
    let (status, body) = token_request(
        &sb,
        &sign(&key, Some("k1"), &claims("test-client", &sb.token_url())),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let token = body["access_token"]
        .as_str()
        .expect("access_token")
        .to_string();
    (sb, token)
}

async fn get(url: &str, token: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .expect("GET")
}

async fn get_json(url: &str, token: &str) -> (u16, Value) {
    let resp = get(url, token).await;
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("json body"))
}

fn next_link(bundle: &Value) -> Option<String> {
    bundle["link"]
        .as_array()?
        .iter()
        .find(|l| l["relation"] == "next")
        .and_then(|l| l["url"].as_str())
        .map(str::to_string)
}

/// Follows `next` links; returns every page.
async fn all_pages(first: &str, token: &str) -> Vec<Value> {
    let mut pages = Vec::new();
    let mut url = Some(first.to_string());
    while let Some(u) = url {
        let (status, page) = get_json(&u, token).await;
        assert_eq!(status, 200, "{u}: {page}");
        url = next_link(&page);
        pages.push(page);
        assert!(pages.len() < 1000, "paging does not end");
    }
    pages
}

fn match_ids(pages: &[Value]) -> Vec<String> {
    pages
        .iter()
        .flat_map(|p| p["entry"].as_array().cloned().unwrap_or_default())
        .filter(|e| e["search"]["mode"] == "match")
        .map(|e| e["resource"]["id"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn ids(resources: &[Value]) -> Vec<String> {
    resources
        .iter()
        .map(|r| r["id"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn has_category(r: &Value, code: &str) -> bool {
    r["category"]
        .as_array()
        .is_some_and(|cats| cats.iter().any(|c| c["coding"][0]["code"] == code))
}

// ---------- data ----------

#[test]
fn data_is_deterministic_per_seed() {
    let a = Dataset::generate(12, 42);
    let b = Dataset::generate(12, 42);
    let c = Dataset::generate(12, 43);
    assert_eq!(a.patient_ids(), b.patient_ids());
    assert_ne!(a.patient_ids(), c.patient_ids());
    for pid in a.patient_ids() {
        for t in SEARCH_TYPES.iter().chain(["Patient"].iter()) {
            assert_eq!(a.resources(t, &pid), b.resources(t, &pid), "{t} of {pid}");
        }
    }
    let p0 = &a.patient_ids()[0];
    assert_ne!(
        a.resources("Observation", p0),
        c.resources("Observation", &c.patient_ids()[0])
    );
}

#[test]
fn data_looks_like_epic() {
    let d = Dataset::generate(20, 7);
    let pids = d.patient_ids();
    let mut seen: std::collections::HashMap<&str, std::collections::HashSet<String>> =
        Default::default();
    let mut empty_pairs = 0;
    for pid in &pids {
        assert!(pid.starts_with('e') && pid.len() >= 40, "{pid}");
        assert!(
            pid.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        );
        let patient = &d.resources("Patient", pid)[0];
        assert_eq!(patient["id"], pid.as_str());
        assert!(patient["identifier"][0]["value"].is_string());
        assert!(patient["birthDate"].as_str().is_some_and(|b| b.len() == 10));
        for t in SEARCH_TYPES {
            let rs = d.resources(t, pid);
            if rs.is_empty() {
                empty_pairs += 1;
            }
            for r in &rs {
                assert_eq!(r["resourceType"], *t);
                let reference = r
                    .get("subject")
                    .or(r.get("patient"))
                    .expect("subject or patient");
                assert_eq!(reference["reference"], format!("Patient/{pid}"));
                let id = r["id"].as_str().expect("id").to_string();
                assert!(
                    seen.entry(t).or_default().insert(id.clone()),
                    "duplicate {t}/{id}"
                );
            }
        }
        // DiagnosticReport results point at this patient's lab Observations.
        let obs_ids = ids(&d.resources("Observation", pid));
        for dr in d.resources("DiagnosticReport", pid) {
            for res in dr["result"].as_array().expect("result") {
                let id = res["reference"]
                    .as_str()
                    .and_then(|r| r.strip_prefix("Observation/"))
                    .expect("ref");
                assert!(obs_ids.iter().any(|o| o == id));
            }
        }
    }
    assert!(empty_pairs > 0, "some type/patient pairs should be empty");
    // Patient 0 is heavy: more than 3 pages of labs at the default page size.
    let labs = d
        .resources("Observation", &pids[0])
        .into_iter()
        .filter(|r| has_category(r, "laboratory"))
        .count();
    assert!(labs > 50, "{labs}");
    // Some observations carry two categories.
    let dual = d
        .resources("Observation", &pids[0])
        .into_iter()
        .filter(|r| has_category(r, "laboratory") && has_category(r, "vital-signs"))
        .count();
    assert!(dual > 0);
    assert!(d.resources("Observation", "nope").is_empty());
    assert!(d.resources("Basic", &pids[0]).is_empty());
}

#[test]
fn generating_many_patients_is_fast() {
    let start = std::time::Instant::now();
    let d = Dataset::generate(10_000, 1);
    assert_eq!(d.patient_ids().len(), 10_000);
    // Generous for unoptimised builds on a busy machine; release is far faster.
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    let unique: std::collections::HashSet<_> = d.patient_ids().into_iter().collect();
    assert_eq!(unique.len(), 10_000);
}

// ---------- pure rules ----------

#[test]
fn jwks_cache_ttl_follows_cache_control() {
    use token::cache_ttl;
    let max = Duration::from_secs(29 * 3600);
    assert_eq!(cache_ttl(None), Some(max));
    assert_eq!(cache_ttl(Some("no-store")), None);
    assert_eq!(cache_ttl(Some("public, no-cache")), None);
    assert_eq!(cache_ttl(Some("max-age=0")), None);
    assert_eq!(
        cache_ttl(Some("public, max-age=60")),
        Some(Duration::from_secs(60))
    );
    assert_eq!(cache_ttl(Some("max-age=999999999")), Some(max));
    assert_eq!(cache_ttl(Some("max-age=abc")), Some(max));
}

#[test]
fn claim_rules_table() {
    let aud = "http://127.0.0.1:1/oauth2/token";
    let t = 1_000_000;
    let base = json!({"iss": "c", "sub": "c", "aud": aud, "exp": t + 240, "jti": "j"});
    let with = |k: &str, v: Value| {
        let mut c = base.clone();
        c[k] = v;
        c
    };
    let without = |k: &str| {
        let mut c = base.clone();
        c.as_object_mut().expect("object").remove(k);
        c
    };
    assert!(token::check_claims(&base, aud, t).is_ok());
    assert!(token::check_claims(&with("aud", json!([aud])), aud, t).is_ok());
    assert!(token::check_claims(&with("exp", json!(t + 300)), aud, t).is_ok());
    assert!(token::check_claims(&with("iat", json!(t + 3)), aud, t).is_ok());
    let bad = [
        (
            "wrong aud",
            with("aud", json!("http://127.0.0.1:1/oauth2/token/")),
        ),
        ("iss != sub", with("sub", json!("other"))),
        ("no iss", without("iss")),
        ("no exp", without("exp")),
        ("exp float", with("exp", json!(t as f64 + 100.5))),
        ("exp string", with("exp", json!((t + 100).to_string()))),
        ("exp past", with("exp", json!(t - 1))),
        ("exp > 300 ahead", with("exp", json!(t + 301))),
        ("nbf future", with("nbf", json!(t + 60))),
        ("iat future", with("iat", json!(t + 60))),
        ("exp - iat > 300", with("iat", json!(t - 100))),
        ("no jti", without("jti")),
        ("jti number", with("jti", json!(5))),
        ("jti too long", with("jti", json!("x".repeat(152)))),
    ];
    for (name, claims) in bad {
        assert!(
            token::check_claims(&claims, aud, t).is_err(),
            "{name} should be rejected"
        );
    }
    assert!(token::check_claims(&with("jti", json!("x".repeat(151))), aud, t).is_ok());
}

// ---------- discovery and tokens ----------

#[tokio::test]
async fn smart_configuration_is_served() {
    let sb = Sandbox::start(SandboxOptions::default())
        .await
        .expect("start");
    let url = format!("{}/.well-known/smart-configuration", sb.base_url());
    let conf: Value = reqwest::get(&url)
        .await
        .expect("GET")
        .json()
        .await
        .expect("json");
    assert_eq!(conf["token_endpoint"], sb.token_url());
    assert_eq!(conf["grant_types_supported"], json!(["client_credentials"]));
    assert_eq!(
        conf["token_endpoint_auth_methods_supported"],
        json!(["private_key_jwt"])
    );
    assert!(
        conf["token_endpoint_auth_signing_alg_values_supported"]
            .as_array()
            .expect("algs")
            .contains(&json!("ES384"))
    );
    assert!(
        conf["capabilities"]
            .as_array()
            .expect("caps")
            .contains(&json!("client-confidential-asymmetric"))
    );
    assert!(conf["scopes_supported"].is_array());
    assert!(
        sb.base_url().starts_with("http://127.0.0.1:") && sb.base_url().ends_with("/api/FHIR/R4")
    );
    assert!(sb.token_url().ends_with("/oauth2/token"));
    let meta: Value = reqwest::get(format!("{}/metadata", sb.base_url()))
        .await
        .expect("GET")
        .json()
        .await
        .expect("json");
    assert_eq!(meta["resourceType"], "CapabilityStatement");
    assert_eq!(
        meta["rest"][0]["security"]["extension"][0]["extension"][0]["valueUri"],
        sb.token_url()
    );
    assert_eq!(
        sb.stats().fhir_requests,
        0,
        "discovery is not a FHIR data request"
    );
    sb.shutdown().await;
}

#[tokio::test]
async fn tokens_are_issued_for_rs384_and_es384() {
    let opts = SandboxOptions {
        token_lifetime: Duration::from_secs(120),
        ..Default::default()
    };
    let sb = Sandbox::start(opts).await.expect("start");
    let rsa = rsa_key("r1");
    let ec = ec_key("e1");
    sb.register_client(ClientRegistration {
        client_id: "c1".into(),
        keys: ClientKeys::Jwks(jwks(&[&rsa, &ec])),
    });
    for (key, kid) in [
        (&rsa, Some("r1")),
        (&ec, Some("e1")),
        (&rsa, None),
        (&ec, None),
    ] {
        let (status, body) =
            token_request(&sb, &sign(key, kid, &claims("c1", &sb.token_url()))).await;
        assert_eq!(status, 200, "{:?} {kid:?}: {body}", key.alg);
        assert!(body["access_token"].as_str().is_some_and(|t| t.len() >= 32));
        assert_eq!(body["token_type"], "bearer");
        assert_eq!(body["expires_in"], 120);
        assert_eq!(body["scope"], "system/Patient.rs system/Observation.rs");
    }
    assert_eq!(sb.stats().tokens_issued, 4);
    // Without a scope parameter, the default scope comes back.
    let resp = reqwest::Client::new()
        .post(sb.token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            (
                "client_assertion",
                &sign(&rsa, Some("r1"), &claims("c1", &sb.token_url())),
            ),
        ])
        .send()
        .await
        .expect("token");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["scope"], "system/*.read");
    sb.shutdown().await;
}

#[tokio::test]
async fn broken_assertions_get_invalid_client() {
    let sb = Sandbox::start(SandboxOptions::default())
        .await
        .expect("start");
    let key = rsa_key("k1");
    let other = rsa_key("k1");
    sb.register_client(ClientRegistration {
        client_id: "c1".into(),
        keys: ClientKeys::Jwks(jwks(&[&key])),
    });
    let aud = sb.token_url();
    let good = claims("c1", &aud);
    let with = |k: &str, v: Value| {
        let mut c = claims("c1", &aud);
        c[k] = v;
        c
    };
    // A reused jti: the first use succeeds, the second is rejected.
    let reused = sign(&key, Some("k1"), &good);
    assert_eq!(token_request(&sb, &reused).await.0, 200);
    let mut es_header_rsa_key = Header::new(Algorithm::HS256);
    es_header_rsa_key.kid = Some("k1".into());
    let hs = jsonwebtoken::encode(
        &es_header_rsa_key,
        &good,
        &EncodingKey::from_secret(b"secret"),
    )
    .expect("hs");
    let mut bad_typ = Header::new(Algorithm::RS384);
    bad_typ.typ = Some("JOSE+JSON".into());
    let bad_typ = jsonwebtoken::encode(&bad_typ, &with("jti", json!("t")), &key.key).expect("typ");
    let mut with_jku = Header::new(Algorithm::RS384);
    with_jku.jku = Some("http://127.0.0.1:1/jwks".into());
    let with_jku =
        jsonwebtoken::encode(&with_jku, &with("jti", json!("u")), &key.key).expect("jku");
    let cases: Vec<(&str, String)> = vec![
        (
            "wrong aud",
            sign(
                &key,
                Some("k1"),
                &with(
                    "aud",
                    json!("https://fhir.epic.com/interconnect-fhir-oauth/oauth2/token"),
                ),
            ),
        ),
        (
            "exp > 300 s ahead",
            sign(&key, Some("k1"), &with("exp", json!(now() + 400))),
        ),
        (
            "exp in the past",
            sign(&key, Some("k1"), &with("exp", json!(now() - 10))),
        ),
        ("reused jti", reused),
        ("unknown kid", sign(&key, Some("k2"), &claims("c1", &aud))),
        (
            "signed by another key",
            sign(&other, Some("k1"), &claims("c1", &aud)),
        ),
        (
            "signed by another key, no kid",
            sign(&other, None, &claims("c1", &aud)),
        ),
        (
            "nbf in the future",
            sign(&key, Some("k1"), &with("nbf", json!(now() + 60))),
        ),
        (
            "iat in the future",
            sign(&key, Some("k1"), &with("iat", json!(now() + 60))),
        ),
        (
            "iss != sub",
            sign(&key, Some("k1"), &with("sub", json!("c2"))),
        ),
        (
            "unknown client",
            sign(&key, Some("k1"), &{
                let mut c = claims("c9", &aud);
                c["sub"] = json!("c9");
                c
            }),
        ),
        (
            "no jti",
            sign(&key, Some("k1"), &{
                let mut c = claims("c1", &aud);
                c.as_object_mut().expect("object").remove("jti");
                c
            }),
        ),
        ("HS256", hs),
        ("typ not JWT", bad_typ),
        ("jku with static keys", with_jku),
        ("not a JWT", "not.a.jwt".into()),
        ("garbage", "%%%".into()),
    ];
    let n = cases.len() as u64;
    for (name, assertion) in cases {
        let (status, body) = token_request(&sb, &assertion).await;
        assert_eq!(status, 400, "{name}");
        assert_eq!(
            body,
            json!({"error": "invalid_client", "error_description": null}),
            "{name}"
        );
    }
    assert_eq!(sb.stats().token_rejections, n);
    assert_eq!(sb.stats().tokens_issued, 1);
    sb.shutdown().await;
}

#[tokio::test]
async fn token_request_form_errors() {
    let sb = Sandbox::start(SandboxOptions::default())
        .await
        .expect("start");
    let client = reqwest::Client::new();
    let send = |form: Vec<(&'static str, &'static str)>| {
        let req = client.post(sb.token_url()).form(&form);
        async move {
            let resp = req.send().await.expect("send");
            (
                resp.status().as_u16(),
                resp.json::<Value>().await.expect("json"),
            )
        }
    };
    let (s, b) = send(vec![("grant_type", "authorization_code")]).await;
    assert_eq!(
        (s, b["error"].as_str()),
        (400, Some("unsupported_grant_type"))
    );
    let (s, b) = send(vec![
        ("grant_type", "client_credentials"),
        ("client_assertion", "x"),
    ])
    .await;
    assert_eq!((s, b["error"].as_str()), (400, Some("invalid_request")));
    let (s, b) = send(vec![]).await;
    assert_eq!(
        (s, b["error"].as_str()),
        (400, Some("unsupported_grant_type"))
    );
    sb.shutdown().await;
}

/// Serves a JWK Set that the test can swap, counting fetches.
struct JwksServer {
    url: String,
    keys: Arc<Mutex<JwkSet>>,
    fetches: Arc<AtomicUsize>,
}

async fn jwks_server(initial: JwkSet, cache_control: &'static str) -> JwksServer {
    let keys = Arc::new(Mutex::new(initial));
    let fetches = Arc::new(AtomicUsize::new(0));
    let (k, f) = (keys.clone(), fetches.clone());
    let app = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            let (k, f) = (k.clone(), f.clone());
            async move {
                f.fetch_add(1, Ordering::SeqCst);
                let body = serde_json::to_string(&*k.lock().expect("lock")).expect("json");
                (
                    [
                        ("cache-control", cache_control),
                        ("content-type", "application/json"),
                    ],
                    body,
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    JwksServer {
        url: format!("http://{addr}/jwks.json"),
        keys,
        fetches,
    }
}

/// A sandbox with `client` registered by its JWK Set URL: a new [`jwks_server`] holding `keys`,
/// answering with `cache_control`.
async fn with_jwks_url(
    client: &str,
    keys: JwkSet,
    cache_control: &'static str,
) -> (Sandbox, JwksServer) {
    let sb = Sandbox::start(SandboxOptions::default())
        .await
        .expect("start");
    let server = jwks_server(keys, cache_control).await;
    sb.register_client(ClientRegistration {
        client_id: client.into(),
        keys: ClientKeys::JwksUrl(server.url.clone()),
    });
    (sb, server)
}

#[tokio::test]
async fn jwks_url_clients_are_fetched_cached_and_refetched_on_rotation() {
    let ec1 = ec_key("ec-1");
    let (sb, server) = with_jwks_url("jku-client", jwks(&[&ec1]), "max-age=3600").await;
    let aud = sb.token_url();
    let (status, body) =
        token_request(&sb, &sign(&ec1, Some("ec-1"), &claims("jku-client", &aud))).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) =
        token_request(&sb, &sign(&ec1, Some("ec-1"), &claims("jku-client", &aud))).await;
    assert_eq!(status, 200);
    assert_eq!(
        server.fetches.load(Ordering::SeqCst),
        1,
        "cached per max-age"
    );

    // jku equal to the registered URL is fine; any other jku is not.
    let mut h = Header::new(Algorithm::ES384);
    h.kid = Some("ec-1".into());
    h.jku = Some(server.url.clone());
    let ok = jsonwebtoken::encode(&h, &claims("jku-client", &aud), &ec1.key).expect("sign");
    assert_eq!(token_request(&sb, &ok).await.0, 200);
    h.jku = Some(format!("{}?x=1", server.url));
    let bad = jsonwebtoken::encode(&h, &claims("jku-client", &aud), &ec1.key).expect("sign");
    assert_eq!(token_request(&sb, &bad).await.0, 400);

    // Rotation: a new kid is unknown to the cache, so the URL is fetched again (once).
    let ec2 = ec_key("ec-2");
    *server.keys.lock().expect("lock") = jwks(&[&ec1, &ec2]);
    let (status, _) =
        token_request(&sb, &sign(&ec2, Some("ec-2"), &claims("jku-client", &aud))).await;
    assert_eq!(status, 200);
    assert_eq!(server.fetches.load(Ordering::SeqCst), 2);
    // A key that is nowhere costs exactly one refetch, then fails.
    let ec3 = ec_key("ec-3");
    let (status, _) =
        token_request(&sb, &sign(&ec3, Some("ec-3"), &claims("jku-client", &aud))).await;
    assert_eq!(status, 400);
    assert_eq!(server.fetches.load(Ordering::SeqCst), 3);
    sb.shutdown().await;
}

#[tokio::test]
async fn jwks_url_no_store_is_fetched_every_time() {
    let rsa = rsa_key("r");
    let (sb, server) = with_jwks_url("c", jwks(&[&rsa]), "no-store").await;
    for _ in 0..2 {
        let (status, _) =
            token_request(&sb, &sign(&rsa, Some("r"), &claims("c", &sb.token_url()))).await;
        assert_eq!(status, 200);
    }
    assert_eq!(server.fetches.load(Ordering::SeqCst), 2);
    // An unreachable URL is just invalid_client.
    sb.register_client(ClientRegistration {
        client_id: "d".into(),
        keys: ClientKeys::JwksUrl("http://127.0.0.1:1/jwks".into()),
    });
    let (status, body) =
        token_request(&sb, &sign(&rsa, Some("r"), &claims("d", &sb.token_url()))).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_client"))
    );
    sb.shutdown().await;
}

// ---------- FHIR ----------

#[tokio::test]
async fn fhir_requires_a_valid_bearer_token() {
    let (sb, token) = started(SandboxOptions::default()).await;
    let pid = sb.dataset().patient_ids()[0].clone();
    let url = format!("{}/Patient/{pid}", sb.base_url());
    let resp = reqwest::get(&url).await.expect("GET");
    assert_eq!(resp.status().as_u16(), 401);
    assert_eq!(
        resp.headers()["www-authenticate"],
        "Bearer error=\"invalid_token\""
    );
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["resourceType"], "OperationOutcome");
    assert_eq!(get(&url, "not-a-token").await.status().as_u16(), 401);
    let resp = get(&url, &token).await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["content-type"], "application/fhir+json");
    let patient: Value = resp.json().await.expect("json");
    assert_eq!(patient, sb.dataset().resources("Patient", &pid)[0]);
    let (status, body) = get_json(&format!("{}/Patient/nobody", sb.base_url()), &token).await;
    assert_eq!(
        (status, body["resourceType"].as_str()),
        (404, Some("OperationOutcome"))
    );
    let stats = sb.stats();
    assert_eq!((stats.fhir_requests, stats.unauthorized), (4, 2));
    sb.shutdown().await;
}

#[tokio::test]
async fn tokens_expire() {
    let opts = SandboxOptions {
        token_lifetime: Duration::from_secs(1),
        ..Default::default()
    };
    let (sb, token) = started(opts).await;
    let url = format!(
        "{}/Patient/{}",
        sb.base_url(),
        sb.dataset().patient_ids()[0]
    );
    assert_eq!(get(&url, &token).await.status().as_u16(), 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(get(&url, &token).await.status().as_u16(), 401);
    sb.shutdown().await;
}

#[tokio::test]
async fn paging_returns_exactly_the_dataset_with_short_pages() {
    let (sb, token) = started(SandboxOptions::default()).await;
    let base = sb.base_url();
    let mut saw_short_non_last = false;
    for pid in sb.dataset().patient_ids().iter().take(4) {
        for t in SEARCH_TYPES {
            let (query, expected): (String, Vec<Value>) = if *t == "Observation" {
                let all = sb.dataset().resources(t, pid);
                (
                    "&category=laboratory".into(),
                    all.into_iter()
                        .filter(|r| has_category(r, "laboratory"))
                        .collect(),
                )
            } else {
                (String::new(), sb.dataset().resources(t, pid))
            };
            let pages = all_pages(&format!("{base}/{t}?patient={pid}{query}"), &token).await;
            assert_eq!(match_ids(&pages), ids(&expected), "{t} of {pid}");
            for (i, page) in pages.iter().enumerate() {
                assert_eq!(page["resourceType"], "Bundle");
                assert_eq!(page["type"], "searchset");
                assert_eq!(page["total"], expected.len());
                let matches = page["entry"]
                    .as_array()
                    .expect("entry")
                    .iter()
                    .filter(|e| e["search"]["mode"] == "match")
                    .count();
                assert!(matches <= 20);
                if i + 1 < pages.len() {
                    let next = next_link(page).expect("next");
                    assert!(
                        next.starts_with(&format!("{base}/{t}?sessionID=")),
                        "{next}"
                    );
                    if matches < 20 {
                        saw_short_non_last = true;
                    }
                }
            }
        }
    }
    assert!(saw_short_non_last);
    // Patient 0 has more than three pages of labs.
    let pid = &sb.dataset().patient_ids()[0];
    let pages = all_pages(
        &format!("{base}/Observation?patient={pid}&category=laboratory"),
        &token,
    )
    .await;
    assert!(pages.len() > 3, "{}", pages.len());
    sb.shutdown().await;
}

#[tokio::test]
async fn search_parameters_and_errors() {
    let (sb, token) = started(SandboxOptions::default()).await;
    let base = sb.base_url();
    let pid = sb.dataset().patient_ids()[0].clone();
    let status = |url: String| {
        let token = token.clone();
        async move {
            let (s, body) = get_json(&url, &token).await;
            (s, body)
        }
    };
    let (s, body) = status(format!("{base}/Observation?patient={pid}")).await;
    assert_eq!(s, 400);
    assert_eq!(body["resourceType"], "OperationOutcome");
    assert!(
        body["issue"][0]["diagnostics"]
            .as_str()
            .is_some_and(|d| d.contains("category or code"))
    );
    assert_eq!(status(format!("{base}/Condition")).await.0, 400);
    assert_eq!(status(format!("{base}/Basic?patient={pid}")).await.0, 404);
    assert_eq!(
        status(format!("{base}/Condition?sessionID=nope&page=2"))
            .await
            .0,
        400
    );
    assert_eq!(status(format!("{base}/Patient")).await.0, 400);
    let (s, body) = status(format!("{base}/Condition?patient=unknown")).await;
    assert_eq!((s, body["total"].as_u64()), (200, Some(0)));
    assert_eq!(body["entry"], json!([]));

    // subject= forms, system|code categories, comma lists and code filters.
    let all = sb.dataset().resources("Observation", &pid);
    let vitals: Vec<Value> = all
        .iter()
        .filter(|r| has_category(r, "vital-signs"))
        .cloned()
        .collect();
    for q in [
        format!("subject=Patient/{pid}&category=vital-signs"),
        format!(
            "subject={pid}&category=http://terminology.hl7.org/CodeSystem/observation-category|vital-signs"
        ),
    ] {
        let pages = all_pages(&format!("{base}/Observation?{q}"), &token).await;
        assert_eq!(match_ids(&pages), ids(&vitals), "{q}");
    }
    let both: Vec<Value> = all
        .iter()
        .filter(|r| has_category(r, "vital-signs") || has_category(r, "social-history"))
        .cloned()
        .collect();
    let pages = all_pages(
        &format!("{base}/Observation?patient={pid}&category=vital-signs,social-history"),
        &token,
    )
    .await;
    assert_eq!(match_ids(&pages), ids(&both));
    let glucose: Vec<Value> = all
        .iter()
        .filter(|r| r["code"]["coding"][0]["code"] == "2345-7")
        .cloned()
        .collect();
    assert!(!glucose.is_empty());
    let pages = all_pages(
        &format!("{base}/Observation?patient={pid}&code=http://loinc.org|2345-7"),
        &token,
    )
    .await;
    assert_eq!(match_ids(&pages), ids(&glucose));

    // The same Observation comes back in two category searches (the client must de-duplicate).
    let labs = match_ids(
        &all_pages(
            &format!("{base}/Observation?patient={pid}&category=laboratory"),
            &token,
        )
        .await,
    );
    let vital_ids = ids(&vitals);
    assert!(labs.iter().any(|id| vital_ids.contains(id)));

    // Patient?_id= works like a read.
    let pages = all_pages(&format!("{base}/Patient?_id={pid}"), &token).await;
    assert_eq!(match_ids(&pages), vec![pid.clone()]);
    sb.shutdown().await;
}

#[tokio::test]
async fn outcome_entries_are_not_counted() {
    let (sb, token) = started(SandboxOptions::default()).await;
    let base = sb.base_url();
    let pids = sb.dataset().patient_ids();
    let mut seen = 0;
    for (i, pid) in pids.iter().enumerate() {
        for t in ["DocumentReference", "Condition"] {
            let (status, page) = get_json(&format!("{base}/{t}?patient={pid}"), &token).await;
            assert_eq!(status, 200);
            let outcomes: Vec<&Value> = page["entry"]
                .as_array()
                .expect("entry")
                .iter()
                .filter(|e| e["search"]["mode"] == "outcome")
                .collect();
            let expected = t == "DocumentReference" || i % 3 == 1;
            assert_eq!(outcomes.len(), usize::from(expected), "{t} of patient {i}");
            if let Some(o) = outcomes.first() {
                seen += 1;
                assert_eq!(o["resource"]["resourceType"], "OperationOutcome");
                assert_eq!(o["resource"]["issue"][0]["severity"], "warning");
                assert_eq!(page["total"], sb.dataset().resources(t, pid).len());
            }
        }
    }
    assert!(seen >= pids.len());
    sb.shutdown().await;
}

#[tokio::test]
async fn injected_status_fault_then_success() {
    let (sb, token) = started(SandboxOptions::default()).await;
    let url = format!(
        "{}/Patient/{}",
        sb.base_url(),
        sb.dataset().patient_ids()[0]
    );
    sb.inject(Fault::Status {
        status: 429,
        retry_after: Some("2".into()),
    });
    sb.inject(Fault::Status {
        status: 503,
        retry_after: None,
    });
    // A 401 does not use up a Status fault.
    assert_eq!(get(&url, "bad").await.status().as_u16(), 401);
    let resp = get(&url, &token).await;
    assert_eq!(resp.status().as_u16(), 429);
    assert_eq!(resp.headers()["retry-after"], "2");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["resourceType"], "OperationOutcome");
    let resp = get(&url, &token).await;
    assert_eq!(resp.status().as_u16(), 503);
    assert!(resp.headers().get("retry-after").is_none());
    assert_eq!(get(&url, &token).await.status().as_u16(), 200);
    assert_eq!(sb.stats().injected_faults, 2);
    sb.shutdown().await;
}

#[tokio::test]
async fn revoke_tokens_fault_gives_401_until_a_new_token() {
    let (sb, token) = started(SandboxOptions::default()).await;
    let url = format!(
        "{}/Patient/{}",
        sb.base_url(),
        sb.dataset().patient_ids()[0]
    );
    sb.inject(Fault::RevokeTokens);
    assert_eq!(get(&url, &token).await.status().as_u16(), 401);
    assert_eq!(get(&url, &token).await.status().as_u16(), 401);
    assert_eq!(sb.stats().injected_faults, 1);
    sb.shutdown().await;
}

#[tokio::test]
async fn foreign_next_link_fault_moves_the_origin() {
    let (sb, token) = started(SandboxOptions::default()).await;
    let pid = sb.dataset().patient_ids()[0].clone();
    let first = format!(
        "{}/Observation?patient={pid}&category=laboratory",
        sb.base_url()
    );
    let (_, normal) = get_json(&first, &token).await;
    let normal_next = next_link(&normal).expect("next");
    sb.inject(Fault::ForeignNextLink {
        origin: "http://127.0.0.1:5555".into(),
    });
    // The fault waits for a page with a next link: this empty search does not use it.
    let (_, empty) = get_json(
        &format!("{}/Condition?patient=nobody", sb.base_url()),
        &token,
    )
    .await;
    assert!(next_link(&empty).is_none());
    let (_, page) = get_json(&first, &token).await;
    let next = next_link(&page).expect("next");
    let expected_tail = normal_next
        .strip_prefix(&sb.base_url().replace("/api/FHIR/R4", ""))
        .expect("same origin");
    assert!(
        next.starts_with("http://127.0.0.1:5555/api/FHIR/R4/Observation?sessionID="),
        "{next}"
    );
    assert_eq!(
        &next["http://127.0.0.1:5555".len()..]
            .split("sessionID=")
            .next(),
        &expected_tail.split("sessionID=").next()
    );
    // Only once.
    let (_, page) = get_json(&first, &token).await;
    assert!(next_link(&page).expect("next").starts_with(&sb.base_url()));
    sb.shutdown().await;
}

#[tokio::test]
async fn random_faults_follow_the_rates() {
    let opts = SandboxOptions {
        rate_429: 1.0,
        ..Default::default()
    };
    let (sb, token) = started(opts).await;
    let url = format!(
        "{}/Patient/{}",
        sb.base_url(),
        sb.dataset().patient_ids()[0]
    );
    let resp = get(&url, &token).await;
    assert_eq!(resp.status().as_u16(), 429);
    assert_eq!(resp.headers()["retry-after"], "1");
    sb.shutdown().await;

    let opts = SandboxOptions {
        rate_5xx: 0.5,
        seed: 9,
        ..Default::default()
    };
    let (sb, token) = started(opts).await;
    let url = format!(
        "{}/Patient/{}",
        sb.base_url(),
        sb.dataset().patient_ids()[0]
    );
    let mut codes = Vec::new();
    for _ in 0..40 {
        codes.push(get(&url, &token).await.status().as_u16());
    }
    let failures = codes.iter().filter(|c| **c == 503).count();
    assert!((5..=35).contains(&failures), "{codes:?}");
    assert_eq!(codes.iter().filter(|c| **c == 200).count() + failures, 40);
    assert_eq!(sb.stats().random_faults, failures as u64);
    sb.shutdown().await;
}

#[tokio::test]
async fn bind_failure_names_the_address() {
    let sb = Sandbox::start(SandboxOptions::default())
        .await
        .expect("start");
    let port: u16 = sb
        .base_url()
        .split(':')
        .nth(2)
        .and_then(|p| p.split('/').next())
        .and_then(|p| p.parse().ok())
        .expect("port");
    let opts = SandboxOptions {
        bind: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        ..Default::default()
    };
    let err = Sandbox::start(opts).await.err().expect("second bind fails");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
    sb.shutdown().await;
}

// ---------- CLI ----------

#[derive(clap::Parser, Debug)]
struct TestCli {
    #[command(flatten)]
    args: SandboxArgs,
}

#[test]
fn cli_registers_clients_from_files_and_urls() {
    use clap::Parser;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("jwks.json");
    let key = ec_key("x");
    std::fs::write(&file, serde_json::to_string(&jwks(&[&key])).expect("json")).expect("write");
    let b = format!("b={}", file.display());
    let cli = TestCli::try_parse_from([
        "sandbox",
        "--client",
        "a=http://127.0.0.1:9/jwks",
        "--client",
        b.as_str(),
        "--page-size=7",
        "--rate-429",
        "0.25",
    ])
    .expect("parse");
    let regs = cli.args.registrations().expect("registrations");
    assert_eq!(regs.len(), 2);
    assert_eq!(regs[0].client_id, "a");
    assert!(matches!(&regs[0].keys, ClientKeys::JwksUrl(u) if u == "http://127.0.0.1:9/jwks"));
    assert_eq!(regs[1].client_id, "b");
    assert!(matches!(&regs[1].keys, ClientKeys::Jwks(set) if set.keys.len() == 1));
    let opts = cli.args.options().expect("options");
    assert_eq!((opts.page_size, opts.rate_429), (7, 0.25));
    assert_eq!(opts.bind.to_string(), "127.0.0.1:8080");

    // Errors name the flag or file.
    let cli = TestCli::try_parse_from(["sandbox", "--client", "a"]).expect("parse");
    let err = cli.args.registrations().expect_err("no source");
    assert!(err.to_string().contains("--client a"), "{err}");
    let cli = TestCli::try_parse_from(["sandbox", "--client", "a=/nonexistent/jwks.json"])
        .expect("parse");
    let err = format!("{:#}", cli.args.registrations().expect_err("missing file"));
    assert!(err.contains("/nonexistent/jwks.json"), "{err}");
    assert!(TestCli::try_parse_from(["sandbox", "--rate-5xx", "2"]).is_err());
}

mod attachments;
mod bulk;

/// Behind a Service the sandbox is reached by another name than the address it listens on: with a
/// public URL, discovery, the token audience and `next` links all use that name.
#[tokio::test]
async fn a_public_url_is_what_clients_are_told() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let public = format!("http://localhost:{port}");
    let (sb, token) = started(SandboxOptions {
        bind: SocketAddr::from(([0, 0, 0, 0], port)),
        public_origin: Some(public.clone()),
        page_size: 1,
        ..SandboxOptions::default()
    })
    .await;
    assert_eq!(sb.base_url(), format!("{public}{FHIR_PATH}"));
    let conf: Value = reqwest::get(format!(
        "{public}{FHIR_PATH}/.well-known/smart-configuration"
    ))
    .await
    .expect("GET")
    .json()
    .await
    .expect("json");
    assert_eq!(conf["token_endpoint"], format!("{public}{TOKEN_PATH}"));
    let pid = sb.dataset().patient_ids()[0].clone();
    let (status, page) = get_json(
        &format!("{public}{FHIR_PATH}/Observation?patient={pid}&category=laboratory"),
        &token,
    )
    .await;
    assert_eq!(status, 200, "{page}");
    let next = next_link(&page).expect("next");
    assert!(next.starts_with(&format!("{public}{FHIR_PATH}")), "{next}");
    assert_eq!(get_json(&next, &token).await.0, 200);
}

#[test]
fn public_url_must_be_an_origin() {
    use clap::Parser;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: super::SandboxArgs,
    }
    let parse = |url: &str| {
        Cli::try_parse_from(["sandbox", "--public-url", url]).map(|c| c.args.public_url)
    };
    assert_eq!(
        parse("http://epic-sandbox.demo.svc:8080/").unwrap(),
        Some("http://epic-sandbox.demo.svc:8080".to_string())
    );
    for bad in ["epic-sandbox:8080", "ftp://x", "http://x/api/FHIR/R4"] {
        let e = parse(bad)
            .err()
            .unwrap_or_else(|| panic!("{bad} accepted"))
            .to_string();
        assert!(e.contains("--public-url"), "{e}");
    }
}
