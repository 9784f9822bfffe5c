//! `TokenSource` against the sandbox over real sockets: discovery, caching, renewal before expiry and
//! after a 401, one shared renewal for concurrent callers, and `check`'s reports.

mod support;

use std::sync::Arc;
use std::time::Duration;

use epic_export::auth::{
    Algorithm, AuthError, SigningKey, TokenSource, TokenSourceConfig, discovery,
};
use epic_export::fhir::{FhirClient, Limits};
use epic_export::http::retry::RetryPolicy;
use epic_export::sandbox::{Fault, SandboxOptions};
use support::*;

fn source(token_url: String, key: SigningKey) -> Arc<TokenSource> {
    Arc::new(TokenSource::new(
        http_client(Duration::from_secs(10)),
        TokenSourceConfig {
            client_id: CLIENT_ID.into(),
            token_url,
            scope: "system/Patient.read".into(),
            key,
            jku: None,
        },
    ))
}

fn same_key(env: &Env) -> SigningKey {
    SigningKey::load(&env.path().join("keys/private.pem"), None, None).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovers_the_token_url() {
    let env = env(SandboxOptions::default()).await;
    let http = http_client(Duration::from_secs(5));
    assert_eq!(
        discovery::token_url(&http, &env.sandbox.base_url())
            .await
            .unwrap(),
        env.sandbox.token_url()
    );
    let err = discovery::token_url(&http, "http://127.0.0.1:1/fhir")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("fhir.tokenUrl"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caches_and_shares_one_renewal_between_concurrent_callers() {
    let env = env(SandboxOptions::default()).await;
    let tokens = source(env.sandbox.token_url(), same_key(&env));
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let t = tokens.clone();
            tokio::spawn(async move { t.token().await.unwrap() })
        })
        .collect();
    let mut got = Vec::new();
    for c in calls {
        got.push(c.await.unwrap());
    }
    assert!(got.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(env.sandbox.stats().tokens_issued, 1);
    assert_eq!(format!("{:?}", got[0]), "AccessToken(<redacted>)");
    assert!(!format!("{tokens:?}").contains(got[0].secret()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renews_before_expiry() {
    let env = env(SandboxOptions {
        token_lifetime: Duration::from_secs(2),
        ..SandboxOptions::default()
    })
    .await;
    let tokens = source(env.sandbox.token_url(), same_key(&env));
    let first = tokens.token().await.unwrap();
    assert_eq!(tokens.token().await.unwrap(), first, "cached while fresh");
    // Renewal happens a fifth of the lifetime before expiry: by 1.7 s a 2 s token is renewed.
    tokio::time::sleep(Duration::from_millis(1700)).await;
    let second = tokens.token().await.unwrap();
    assert_ne!(first, second);
    assert_eq!(
        env.sandbox.stats().tokens_issued,
        2,
        "each request signed a new assertion (the sandbox rejects a reused jti)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_renews_once_for_all_concurrent_requests() {
    let env = env(SandboxOptions {
        patients: 3,
        ..SandboxOptions::default()
    })
    .await;
    let tokens = source(env.sandbox.token_url(), same_key(&env));
    let client = Arc::new(
        FhirClient::new(
            &env.sandbox.base_url(),
            tokens.clone(),
            Limits {
                concurrency: 8,
                requests_per_second: None,
                retry: RetryPolicy::default(),
                request_timeout: Duration::from_secs(10),
            },
        )
        .unwrap(),
    );
    let id = env.sandbox.dataset().patient_ids()[0].clone();
    client
        .get(&client.url(&format!("Patient/{id}")))
        .await
        .unwrap();
    env.sandbox.inject(Fault::RevokeTokens);
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let c = client.clone();
            let url = c.url(&format!("Patient/{id}"));
            tokio::spawn(async move { c.get(&url).await.map(|b| b.len()) })
        })
        .collect();
    for c in calls {
        assert!(c.await.unwrap().unwrap() > 0);
    }
    assert_eq!(
        env.sandbox.stats().tokens_issued,
        2,
        "one renewal shared by every request that saw the 401"
    );
    assert!(env.sandbox.stats().unauthorized >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_client_explains_the_likely_causes() {
    let env = env(SandboxOptions::default()).await;
    // A key the sandbox has never seen.
    let tokens = source(
        env.sandbox.token_url(),
        SigningKey::generate(Algorithm::ES384).unwrap(),
    );
    let err = tokens.token().await.unwrap_err();
    assert!(matches!(err, AuthError::InvalidClient { .. }));
    let text = err.to_string();
    for cause in [
        "another environment",
        "aud",
        "not registered",
        "kid",
        "clock",
    ] {
        assert!(text.contains(cause), "missing {cause:?} in:\n{text}");
    }
    assert_eq!(env.sandbox.stats().token_rejections, 1);
    // aud must be the token URL exactly: the same server under another spelling is refused.
    let wrong_aud = env.sandbox.token_url().replace("127.0.0.1", "localhost");
    let tokens = source(wrong_aud, same_key(&env));
    assert!(matches!(
        tokens.token().await.unwrap_err(),
        AuthError::InvalidClient { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_success_without_the_token_and_failure_with_causes() {
    let env = env_with_key(
        SandboxOptions {
            patients: 2,
            ..SandboxOptions::default()
        },
        Algorithm::RS384,
    )
    .await;
    let patients = env.sandbox.dataset().patient_ids();
    let config = env.write_config(&patients, ALL_SEARCHES, "");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_epic-export"))
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("token: ok")
            && stdout.contains("lifetime 3600 s")
            && stdout.contains("discovered"),
        "{stdout}"
    );
    assert!(
        stdout.contains("system/Observation.read"),
        "granted scope is shown: {stdout}"
    );
    assert!(!stdout.contains("access_token"));

    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(CLIENT_ID, "wrong-client");
    std::fs::write(&config, text).unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_epic-export"))
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout.contains("token: FAILED")
            && stdout.contains("invalid_client")
            && stdout.contains("clock"),
        "{stdout}"
    );
}

#[test]
fn an_https_client_builds_with_the_single_tls_provider() {
    // Two rustls crypto providers in the tree make this panic at run time.
    let client = http_client(Duration::from_secs(1));
    drop(client);
    let _ = reqwest::Client::builder()
        .https_only(true)
        .build()
        .expect("HTTPS client");
}
