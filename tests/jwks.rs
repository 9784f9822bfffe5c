//! `epic-export check` with `auth.jwksUrl`: the real binary against the in-process sandbox, whose
//! client is registered with a JWK Set URL served over a real socket by a small axum server here.

mod support;

use epic_export::auth::{Algorithm, SigningKey};
use epic_export::sandbox::{ClientKeys, ClientRegistration, SandboxOptions};
use serde_json::{Value, json};
use support::CLIENT_ID;

/// Serves `set` at `http://127.0.0.1:PORT/jwks.json` with `Cache-Control: max-age=300`.
async fn serve_jwks(set: Value) -> String {
    let body = serde_json::to_string(&set).unwrap();
    let app = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            let body = body.clone();
            async move {
                (
                    [
                        ("cache-control", "max-age=300"),
                        ("content-type", "application/json"),
                    ],
                    body,
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/jwks.json")
}

/// A URL nothing listens on (a port that was just free).
async fn dead_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}/jwks.json")
}

struct Checked {
    code: Option<i32>,
    stdout: String,
    key: SigningKey,
}

/// Starts a sandbox whose client uses the JWK Set URL that `url_for(our key)` returns, writes a
/// config with that `auth.jwksUrl`, and runs `epic-export check` on it.
async fn check_with<F, Fut>(url_for: F) -> Checked
where
    F: FnOnce(&SigningKey) -> Fut,
    Fut: std::future::Future<Output = String>,
{
    let env = support::env(SandboxOptions::default()).await;
    let url = url_for(&env.key).await;
    env.sandbox.register_client(ClientRegistration {
        client_id: CLIENT_ID.into(),
        keys: ClientKeys::JwksUrl(url.clone()),
    });
    let config = env.write_config(&["p1".into()], "resource_type\nPatient\n", "");
    let yaml = std::fs::read_to_string(&config).unwrap().replace(
        "  privateKeyFile: keys/private.pem\n",
        &format!("  privateKeyFile: keys/private.pem\n  jwksUrl: {url}\n"),
    );
    std::fs::write(&config, yaml).unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_epic-export"))
        .args(["check", "--config"])
        .arg(&config)
        .env("RUST_LOG", "debug")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Shown when a test fails.
    eprintln!(
        "--- check stdout:\n{}\n--- check stderr:\n{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    let pem = std::fs::read_to_string(env.path().join("keys/private.pem")).unwrap();
    let pem_body = pem.lines().nth(1).unwrap();
    for text in [&stdout[..], &stderr[..]] {
        assert!(
            !text.contains("PRIVATE KEY") && !text.contains(pem_body) && !text.contains("\"d\":"),
            "check printed key material:\n{text}"
        );
    }
    Checked {
        code: out.status.code(),
        stdout,
        key: env.key,
    }
}

fn jwks_of(keys: &[&SigningKey]) -> Value {
    json!({ "keys": keys.iter().map(|k| k.public_jwk()).collect::<Vec<_>>() })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_good_jwk_set_url_is_ok() {
    let other = SigningKey::generate(Algorithm::ES384).unwrap();
    let c = check_with(|key| serve_jwks(jwks_of(&[&other, key]))).await;
    assert_eq!(c.code, Some(0), "{}", c.stdout);
    let line = c
        .stdout
        .lines()
        .find(|l| l.starts_with("jwks: ok ("))
        .unwrap_or_else(|| panic!("no jwks line:\n{}", c.stdout));
    assert!(
        line.contains(&format!("has kid {}", c.key.kid()))
            && line.contains("2 keys")
            && line.contains("Cache-Control max-age=300"),
        "{line}"
    );
    // http is allowed (the sandbox is http) but Epic needs https: a warning, not a failure.
    assert!(
        c.stdout.contains("jwks: warning:") && c.stdout.contains("Epic requires TLS"),
        "{}",
        c.stdout
    );
    assert!(c.stdout.contains("token: ok"), "{}", c.stdout);
    // The jwks line comes before the token line.
    assert!(c.stdout.find("jwks: ok").unwrap() < c.stdout.find("token: ok").unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_set_without_our_kid_fails_and_lists_the_kids() {
    let a = SigningKey::generate(Algorithm::ES384).unwrap();
    let b = SigningKey::generate(Algorithm::ES384).unwrap();
    let set = jwks_of(&[&a, &b]);
    let c = check_with(|_| serve_jwks(set)).await;
    assert_eq!(c.code, Some(1), "{}", c.stdout);
    assert!(c.stdout.contains("jwks: FAILED"), "{}", c.stdout);
    assert!(
        c.stdout
            .contains(&format!("({}) matches no key", c.key.kid()))
            && c.stdout
                .contains(&format!("its kids: {}, {}", a.kid(), b.kid()))
            && c.stdout.contains("epic-export jwks --key"),
        "{}",
        c.stdout
    );
    // The token request still ran, and the sandbox refused it.
    assert!(c.stdout.contains("token: FAILED"), "{}", c.stdout);
}

#[tokio::test(flavor = "multi_thread")]
async fn another_key_under_our_kid_fails() {
    let other = SigningKey::generate(Algorithm::ES384).unwrap();
    let c = check_with(|key| {
        let mut jwk = other.public_jwk();
        jwk["kid"] = json!(key.kid());
        serve_jwks(json!({ "keys": [jwk] }))
    })
    .await;
    assert_eq!(c.code, Some(1), "{}", c.stdout);
    assert!(
        c.stdout.contains("jwks: FAILED")
            && c.stdout.contains(&format!(
                "publishes another key under our kid {}",
                c.key.kid()
            )),
        "{}",
        c.stdout
    );
    assert!(c.stdout.contains("token: FAILED"), "{}", c.stdout);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_published_private_key_fails() {
    // Someone published a full private JWK (here a made-up `d`) next to ours.
    let c = check_with(|key| {
        let mut leaked = key.public_jwk();
        leaked["d"] = json!("bm90LWEtcmVhbC1wcml2YXRlLWtleQ");
        serve_jwks(json!({ "keys": [leaked] }))
    })
    .await;
    assert_eq!(c.code, Some(1), "{}", c.stdout);
    assert!(
        c.stdout.contains("jwks: FAILED")
            && c.stdout.contains("publishes a private key")
            && c.stdout.contains("remove it and rotate this key"),
        "{}",
        c.stdout
    );
    assert!(!c.stdout.contains("bm90LWEtcmVhbC1wcml2YXRlLWtleQ"));
    // The token line is there too, whatever the sandbox made of that set.
    assert!(c.stdout.contains("token: "), "{}", c.stdout);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_url_fails() {
    let c = check_with(|_| dead_url()).await;
    assert_eq!(c.code, Some(1), "{}", c.stdout);
    assert!(
        c.stdout.contains("jwks: FAILED") && c.stdout.contains("cannot reach the JWK Set URL"),
        "{}",
        c.stdout
    );
    assert!(c.stdout.contains("token: FAILED"), "{}", c.stdout);
}

#[tokio::test(flavor = "multi_thread")]
async fn http_errors_and_non_json_fail() {
    let app = axum::Router::new()
        .route(
            "/missing.json",
            axum::routing::get(|| async { (axum::http::StatusCode::NOT_FOUND, "no") }),
        )
        .route(
            "/page.html",
            axum::routing::get(|| async { "<html>login</html>" }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let c = check_with(|_| async move { format!("http://{addr}/missing.json") }).await;
    assert_eq!(c.code, Some(1));
    assert!(c.stdout.contains("answered HTTP 404"), "{}", c.stdout);
    let c = check_with(|_| async move { format!("http://{addr}/page.html") }).await;
    assert_eq!(c.code, Some(1));
    assert!(
        c.stdout.contains("did not send a JSON JWK Set"),
        "{}",
        c.stdout
    );
}
