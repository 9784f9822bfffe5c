//! The operator's JWK Set endpoint over a real socket, reading EpicExports and key Secrets from the
//! in-process fake API server: headers (Cache-Control, strong ETag, 304), public members only, the
//! per-export and per-Secret forms, 404 for anything else without touching the API, a Secret read
//! at most once per refresh interval, and a next key published with the short rotation max-age.

#[path = "support/fake_api.rs"]
mod fake_api;

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use epic_export::auth::keys::{Algorithm, SigningKey};
use epic_export::operator::jwks::{JwksSettings, serve};
use fake_api::FakeApi;
use serde_json::{Value, json};

const NS: &str = "phi";
const EXPORTS: &str = "apis/fhirexport.dev/v1alpha1/epicexports";
const SECRETS: &str = "api/v1/secrets";

fn b64(key: &SigningKey) -> String {
    STANDARD.encode(key.to_pkcs8_pem().unwrap())
}

fn export(fake: &FakeApi, name: &str, auth_extra: Value) {
    let mut auth =
        json!({"clientId": "abc", "keySecretRef": {"name": "epic-key", "key": "private.pem"}});
    for (k, v) in auth_extra.as_object().unwrap() {
        auth[k] = v.clone();
    }
    fake.put(
        EXPORTS,
        json!({
            "metadata": {"name": name, "namespace": NS},
            "spec": {
                "schedule": "0 2 * * *",
                "fhir": {"baseUrl": "https://fhir.example.org/api/FHIR/R4"},
                "auth": auth,
                "source": {"bulk": {"level": "system"}},
                "output": {"volumeClaimName": "exports"},
            },
        }),
    );
}

struct Endpoint {
    base: String,
    http: reqwest::Client,
    _task: tokio::task::JoinHandle<()>,
}

impl Endpoint {
    async fn start(fake: &FakeApi, settings: JwksSettings) -> Endpoint {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let client = fake.client();
        let task = tokio::spawn(async move {
            serve(client, None, listener, settings).await.unwrap();
        });
        let endpoint = Endpoint {
            base,
            http: reqwest::Client::new(),
            _task: task,
        };
        // Ready once the EpicExport cache is filled (503 before).
        for _ in 0..100 {
            if endpoint.get("/jwks/phi/nightly.json").await.status() != 503 {
                return endpoint;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the JWKS endpoint never became ready");
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
    }
}

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

fn kids(doc: &Value) -> Vec<&str> {
    doc["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect()
}

fn secret_reads(fake: &FakeApi) -> usize {
    fake.requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path.contains("/secrets"))
        .count()
}

#[tokio::test]
async fn serves_public_keys_with_cache_headers_and_nothing_else() {
    let fake = FakeApi::new();
    let active = SigningKey::generate(Algorithm::RS384).unwrap();
    fake.put(
        SECRETS,
        json!({"metadata": {"name": "epic-key", "namespace": NS}, "data": {"private.pem": b64(&active)}}),
    );
    fake.put(
        SECRETS,
        json!({"metadata": {"name": "tls", "namespace": NS}, "data": {"private.pem": b64(&active)}}),
    );
    export(&fake, "nightly", json!({}));
    export(
        &fake,
        "named",
        json!({"keyId": "my-key-1", "algorithm": "RS512"}),
    );
    let settings = JwksSettings {
        max_age: Duration::from_secs(3600),
        rotation_max_age: Duration::from_secs(300),
        refresh: Duration::from_millis(300),
    };
    let ep = Endpoint::start(&fake, settings).await;

    let r = ep.get("/jwks/phi/nightly.json").await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), "application/json");
    assert_eq!(header(&r, "cache-control"), "public, max-age=3600");
    let etag = header(&r, "etag");
    assert!(
        etag.starts_with('"') && etag.ends_with('"') && etag.len() > 10,
        "strong ETag: {etag}"
    );
    let text = r.text().await.unwrap();
    let doc: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(kids(&doc), [active.kid()]);
    assert_eq!(doc["keys"][0], active.public_jwk());
    for private in [
        "\"d\"", "\"p\"", "\"q\"", "\"dp\"", "\"dq\"", "\"qi\"", "PRIVATE",
    ] {
        assert!(!text.contains(private), "{private} in {text}");
    }

    // Revalidation: the same ETag gets 304 with the cache headers and no body.
    let r = ep
        .http
        .get(format!("{}/jwks/phi/nightly.json", ep.base))
        .header("If-None-Match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    assert_eq!(header(&r, "etag"), etag);
    assert_eq!(header(&r, "cache-control"), "public, max-age=3600");
    assert!(r.bytes().await.unwrap().is_empty());
    // HEAD works like GET without the body.
    let r = ep
        .http
        .head(format!("{}/jwks/phi/nightly.json", ep.base))
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.status().as_u16(), header(&r, "etag")),
        (200, etag.clone())
    );

    // The export's keyId and algorithm are what it signs with, so they are what is published.
    let doc: Value = ep.get("/jwks/phi/named.json").await.json().await.unwrap();
    assert_eq!(kids(&doc), ["my-key-1"]);
    assert_eq!(doc["keys"][0]["alg"], "RS512");
    // The per-Secret form: thumbprint key ids.
    let r = ep.get("/jwks/phi/secrets/epic-key.json").await;
    assert_eq!(r.status(), 200);
    let doc: Value = r.json().await.unwrap();
    assert_eq!(kids(&doc), [active.kid()]);

    // Anything else is 404, and unknown names never reach the API server.
    let reads = secret_reads(&fake);
    for path in [
        "/jwks/phi/unknown.json",
        "/jwks/other/nightly.json",
        "/jwks/phi/nightly",
        "/jwks/phi/secrets/tls.json",
        "/jwks/phi/secrets/unknown.json",
        "/jwks/phi/nightly.json/x",
        "/jwks/",
        "/metrics",
        "/",
    ] {
        let r = ep.get(path).await;
        assert_eq!(r.status(), 404, "{path}");
        assert_eq!(header(&r, "cache-control"), "no-store", "{path}");
    }
    assert_eq!(secret_reads(&fake), reads, "404s read no Secret");

    // However many fetches, the Secret is read at most once per refresh interval.
    tokio::time::sleep(Duration::from_millis(350)).await;
    let reads = secret_reads(&fake);
    for _ in 0..50 {
        assert_eq!(ep.get("/jwks/phi/nightly.json").await.status(), 200);
    }
    assert!(
        secret_reads(&fake) - reads <= 1,
        "{} reads",
        secret_reads(&fake) - reads
    );

    // A next key in the Secret: both published, signing key first, with the short max-age.
    let next = SigningKey::generate(Algorithm::ES384).unwrap();
    fake.put(
        SECRETS,
        json!({"metadata": {"name": "epic-key", "namespace": NS}, "data": {
            "private.pem": b64(&active), "next-private.pem": b64(&next)}}),
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    let r = ep.get("/jwks/phi/nightly.json").await;
    assert_eq!(header(&r, "cache-control"), "public, max-age=300");
    assert_ne!(header(&r, "etag"), etag);
    let doc: Value = r.json().await.unwrap();
    assert_eq!(kids(&doc), [active.kid(), next.kid()]);
    assert_eq!(doc["keys"][1]["alg"], "ES384");

    // The export gone: its URL is 404 at once (the Secret still serves the other export).
    assert_eq!(ep.get("/jwks/phi/named.json").await.status(), 200);
    fake.delete(EXPORTS, NS, "named");
    let mut gone = false;
    for _ in 0..40 {
        if ep.get("/jwks/phi/named.json").await.status() == 404 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "a deleted export's JWKS is no longer served");
    assert_eq!(ep.get("/jwks/phi/nightly.json").await.status(), 200);

    // The Secret gone: 404 (nothing right to publish), after the refresh interval.
    fake.delete(SECRETS, NS, "epic-key");
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(ep.get("/jwks/phi/nightly.json").await.status(), 404);
}
