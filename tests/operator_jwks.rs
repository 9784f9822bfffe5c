//! The JWK Set endpoint (`epic-export jwks-server`) over a real socket, on the in-process fake API
//! server, with a client that any request other than the EpicExport watch would get a 403 from (as
//! its RBAC, get/list/watch on EpicExports only, would): it serves what the EpicExports' status
//! publishes, with Cache-Control, a strong ETag and 304, public members only, the per-export and
//! per-Secret forms, 404 for anything else, and the short max-age while a rotation publishes a next
//! key; and end to end, the controller publishes a key Secret's public keys in the status (following
//! the Secret, since it does not watch Secrets) and the endpoint serves them without ever touching a
//! Secret.

#[path = "support/fake_api.rs"]
mod fake_api;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use epic_export::auth::keys::{Algorithm, SigningKey};
use epic_export::operator::controller::Settings;
use epic_export::operator::images::ImagePolicy;
use epic_export::operator::jwks::{JwksSettings, serve};
use epic_export::operator::{ControllerOptions, run_controller};
use fake_api::FakeApi;
use serde_json::{Value, json};

const NS: &str = "phi";
const EXPORTS: &str = "apis/fhirexport.dev/v1alpha1/epicexports";
const SECRETS: &str = "api/v1/secrets";

fn b64(key: &SigningKey) -> String {
    STANDARD.encode(key.to_pkcs8_pem().unwrap())
}

fn jwk(key: &SigningKey) -> Value {
    key.public_jwk()
}

/// An export of key Secret `epic-key` whose status publishes `keys` (none: no `publicKeys`).
fn export(fake: &FakeApi, name: &str, auth_extra: Value, keys: &[Value]) {
    let mut auth =
        json!({"clientId": "abc", "keySecretRef": {"name": "epic-key", "key": "private.pem"}});
    for (k, v) in auth_extra.as_object().unwrap() {
        auth[k] = v.clone();
    }
    let mut obj = json!({
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "schedule": "0 2 * * *",
            "fhir": {"baseUrl": "https://fhir.example.org/api/FHIR/R4"},
            "auth": auth,
            "source": {"bulk": {"level": "system"}},
            "output": {"volumeClaimName": "exports"},
        },
    });
    if !keys.is_empty() {
        obj["status"] = json!({"publicKeys": {"keys": keys}});
    }
    fake.put(EXPORTS, obj);
}

struct Endpoint {
    base: String,
    http: reqwest::Client,
    _task: tokio::task::JoinHandle<()>,
}

impl Endpoint {
    /// The endpoint with a client that may only read EpicExports.
    async fn start(fake: &FakeApi, settings: JwksSettings) -> Endpoint {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let client = fake.client_forbidding(|r| !r.path.ends_with("/epicexports"));
        let task = tokio::spawn(async move {
            let ready = Arc::new(AtomicBool::new(false));
            serve(client, None, listener, settings, ready)
                .await
                .unwrap();
        });
        let endpoint = Endpoint {
            base,
            http: reqwest::Client::new(),
            _task: task,
        };
        // Ready once the EpicExport cache is filled (503 before).
        for _ in 0..100 {
            if endpoint.get("/jwks/phi/any.json").await.status() != 503 {
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

    /// Polls `path` until `done` accepts the response.
    async fn until(&self, path: &str, what: &str, done: impl Fn(&reqwest::Response) -> bool) {
        for _ in 0..300 {
            if done(&self.get(path).await) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("timed out waiting for {path}: {what}");
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

/// Every request the endpoint's client made was a list or watch of EpicExports, and none was refused.
fn only_epicexport_watches(fake: &FakeApi) {
    assert_eq!(fake.forbidden(), Vec::new(), "requests RBAC would refuse");
    for r in fake.requests() {
        assert!(
            r.path.ends_with("/epicexports") && matches!(r.verb(), "list" | "watch"),
            "the endpoint made an API request other than the EpicExport watch: {r:?}"
        );
    }
}

#[tokio::test]
async fn serves_the_status_keys_with_cache_headers_and_nothing_else() {
    let fake = FakeApi::new();
    let active = SigningKey::generate(Algorithm::RS384).unwrap();
    let named = SigningKey::from_pem(
        active.to_pkcs8_pem().unwrap().as_bytes(),
        std::path::Path::new("private.pem"),
        Some(Algorithm::RS512),
        Some("my-key-1".into()),
    )
    .unwrap();
    export(&fake, "nightly", json!({}), &[jwk(&active)]);
    export(
        &fake,
        "named",
        json!({"keyId": "my-key-1", "algorithm": "RS512"}),
        &[jwk(&named)],
    );
    export(&fake, "unpublished", json!({}), &[]);
    let settings = JwksSettings {
        max_age: Duration::from_secs(3600),
        rotation_max_age: Duration::from_secs(300),
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
    // The per-Secret form: the keys of every export using that Secret, each kid once.
    let r = ep.get("/jwks/phi/secrets/epic-key.json").await;
    assert_eq!(r.status(), 200);
    let doc: Value = r.json().await.unwrap();
    let mut secret_kids = kids(&doc);
    secret_kids.sort();
    let mut want = vec![active.kid(), "my-key-1"];
    want.sort();
    assert_eq!(secret_kids, want);

    // Anything else is 404, also an export with nothing published.
    for path in [
        "/jwks/phi/unknown.json",
        "/jwks/phi/unpublished.json",
        "/jwks/other/nightly.json",
        "/jwks/phi/nightly",
        "/jwks/phi/secrets/tls.json",
        "/jwks/phi/nightly.json/x",
        "/jwks/",
        "/healthz",
        "/metrics",
        "/",
    ] {
        let r = ep.get(path).await;
        assert_eq!(r.status(), 404, "{path}");
        assert_eq!(header(&r, "cache-control"), "no-store", "{path}");
    }

    // A next key published (a rotation): both keys, signing key first, with the short max-age.
    let next = SigningKey::generate(Algorithm::ES384).unwrap();
    export(&fake, "nightly", json!({}), &[jwk(&active), jwk(&next)]);
    ep.until("/jwks/phi/nightly.json", "the next key", |r| {
        header(r, "cache-control") == "public, max-age=300"
    })
    .await;
    let r = ep.get("/jwks/phi/nightly.json").await;
    assert_ne!(header(&r, "etag"), etag);
    let doc: Value = r.json().await.unwrap();
    assert_eq!(kids(&doc), [active.kid(), next.kid()]);
    assert_eq!(doc["keys"][1]["alg"], "ES384");
    let r = ep.get("/jwks/phi/secrets/epic-key.json").await;
    assert_eq!(header(&r, "cache-control"), "public, max-age=300");

    // The export gone: its URL is 404 (the Secret's still serves the other export's key).
    fake.delete(EXPORTS, NS, "named");
    ep.until("/jwks/phi/named.json", "404 once deleted", |r| {
        r.status() == 404
    })
    .await;
    let doc: Value = ep
        .get("/jwks/phi/secrets/epic-key.json")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(kids(&doc), [active.kid(), next.kid()]);

    // Nothing published any more (the key Secret is gone): 404.
    export(&fake, "nightly", json!({}), &[]);
    ep.until("/jwks/phi/nightly.json", "404 once unpublished", |r| {
        r.status() == 404
    })
    .await;
    only_epicexport_watches(&fake);
}

/// The controller reads the key Secret and publishes its public keys in the status; the endpoint,
/// whose client would get a 403 for any Secret request, serves them, follows a next key added to the
/// Secret by hand (the controller looks again every `resync`: it does not watch Secrets) and stops
/// serving them when the Secret is gone.
#[tokio::test]
async fn the_controller_publishes_and_the_endpoint_serves_without_reading_a_secret() {
    let fake = FakeApi::new();
    let first = SigningKey::generate(Algorithm::ES384).unwrap();
    fake.put(
        SECRETS,
        json!({"metadata": {"name": "epic-key", "namespace": NS}, "data": {"private.pem": b64(&first)}}),
    );
    export(&fake, "nightly", json!({}), &[]);

    let mut settings = Settings::new(ImagePolicy::only("registry.example/epic-export:1.0"));
    settings.resync = Duration::from_millis(500);
    settings.reference_retry = Duration::from_millis(500);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let operator = tokio::spawn(run_controller(
        fake.client(),
        ControllerOptions {
            settings,
            http_addr: None,
            leader_election: None,
        },
        async {
            let _ = stopped.await;
        },
    ));
    let ep = Endpoint::start(&fake, JwksSettings::default()).await;

    ep.until("/jwks/phi/nightly.json", "the published key", |r| {
        r.status() == 200
    })
    .await;
    let doc: Value = ep.get("/jwks/phi/nightly.json").await.json().await.unwrap();
    assert_eq!(doc["keys"], json!([first.public_jwk()]));
    let status = fake.get(EXPORTS, NS, "nightly").unwrap()["status"].clone();
    assert_eq!(status["publicKeys"]["keys"], json!([first.public_jwk()]));
    assert!(
        !status.to_string().contains("\"d\""),
        "no private member in the status: {status}"
    );

    // A next key staged in the Secret by hand is published at the next pass.
    let next = SigningKey::generate(Algorithm::ES384).unwrap();
    fake.put(
        SECRETS,
        json!({"metadata": {"name": "epic-key", "namespace": NS}, "data": {
            "private.pem": b64(&first), "next-private.pem": b64(&next)}}),
    );
    ep.until("/jwks/phi/nightly.json", "the next key", |r| {
        header(r, "cache-control") == "public, max-age=300"
    })
    .await;
    let doc: Value = ep.get("/jwks/phi/nightly.json").await.json().await.unwrap();
    assert_eq!(kids(&doc), [first.kid(), next.kid()]);

    // The Secret gone: the export stalls and nothing is published.
    fake.delete(SECRETS, NS, "epic-key");
    ep.until("/jwks/phi/nightly.json", "404 without the Secret", |r| {
        r.status() == 404
    })
    .await;
    let status = fake.get(EXPORTS, NS, "nightly").unwrap()["status"].clone();
    assert!(status.get("publicKeys").is_none(), "{status}");

    assert_eq!(
        fake.forbidden(),
        Vec::new(),
        "the endpoint never tried to read a Secret"
    );
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), operator)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// `epic-export jwks-server` as a process, with a kubeconfig pointing at the fake API server over
/// HTTP: ready once its cache is filled, serves the status keys, reads nothing but EpicExports, and
/// stops cleanly on SIGTERM.
#[tokio::test]
async fn the_jwks_server_command_serves_the_status_keys() {
    let fake = FakeApi::new();
    let key = SigningKey::generate(Algorithm::ES384).unwrap();
    export(&fake, "nightly", json!({}), &[jwk(&key)]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = format!("http://{}", listener.local_addr().unwrap());
    let _server = {
        let fake = fake.clone();
        epic_export::task::AbortOnDrop(tokio::spawn(async move { fake.serve_http(listener).await }))
    };
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"{api}\"}}\nusers:\n- name: t\n  user: {{token: t}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: t}}\ncurrent-context: fake\n"
        ),
    )
    .unwrap();
    let port = |_: ()| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let (addr, health) = (port(()), port(()));
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_epic-export"))
        .args(["jwks-server", "--addr", &addr.to_string()])
        .args(["--health-addr", &health.to_string(), "--max-age", "600"])
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let mut ready = false;
    for _ in 0..200 {
        if let Ok(r) = http.get(format!("http://{health}/readyz")).send().await
            && r.status() == 200
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "/readyz never answered 200");
    let r = http
        .get(format!("http://{addr}/jwks/phi/nightly.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "cache-control"), "public, max-age=600");
    let doc: Value = r.json().await.unwrap();
    assert_eq!(doc["keys"], json!([key.public_jwk()]));
    // Its health port serves its metrics: the requests by result (EpicExportJwksErrors).
    let r = http
        .get(format!("http://{addr}/jwks/phi/unknown.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let metrics = http
        .get(format!("http://{health}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "epic_export_jwks_requests_total{result=\"ok\"} 1",
        "epic_export_jwks_requests_total{result=\"not_found\"} 1",
        "epic_export_jwks_requests_total{result=\"unavailable\"} 0",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    for r in fake.requests() {
        assert!(
            r.path.ends_with("/epicexports"),
            "the JWK Set server made another request: {r:?}"
        );
    }
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("stops within 10 s on SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0));
}
