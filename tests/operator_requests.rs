//! The exact API requests of the controller's critical writes, checked with tower-test: the status
//! write (server-side apply on the status subresource with our field manager, and no request at all
//! when nothing changed), the adoption of an existing run on 409 instead of a duplicate, and a Job
//! the API server refuses (422) becoming a spec problem instead of a retry loop.

use std::time::Duration;

use epic_export::operator::controller::apply::{
    ApplyError, FIELD_MANAGER, Started, start_run, write_status,
};
use epic_export::operator::controller::dereference::dereference;
use epic_export::operator::crd::{EpicExport, EpicExportStatus};
use epic_export::operator::job::{RunInputs, build_job};
use http::{Request, Response};
use kube::client::Body;
use serde_json::{Value, json};
use tower_test::mock::{self, Handle};

type ApiHandle = Handle<Request<Body>, Response<Body>>;

fn client() -> (kube::Client, ApiHandle) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(service, "default"), handle)
}

fn export() -> EpicExport {
    serde_json::from_value(json!({
        "apiVersion": "fhirexport.dev/v1alpha1",
        "kind": "EpicExport",
        "metadata": {"name": "nightly", "namespace": "phi", "uid": "u-1", "generation": 1},
        "spec": {
            "schedule": "0 2 * * *",
            "fhir": {"baseUrl": "https://fhir.example.org/api/FHIR/R4"},
            "auth": {"clientId": "abc", "keySecretRef": {"name": "epic-key", "key": "private.pem"}},
            "source": {"search": {"rosterRef": {"configMapName": "roster", "key": "roster.csv"}, "resources": [{"type": "Patient"}]}},
            "output": {"volumeClaimName": "exports"},
        }
    }))
    .unwrap()
}

fn respond(code: u16, body: Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap()
}

async fn body_json(req: Request<Body>) -> Value {
    let bytes = req.into_body().collect_bytes().await.unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test]
async fn status_is_written_with_server_side_apply_and_only_when_it_changed() {
    let (client, mut handle) = client();
    let e = export();
    let status = EpicExportStatus {
        observed_generation: Some(1),
        last_schedule_time: Some("2026-12-01T02:00:00Z".into()),
        ..EpicExportStatus::default()
    };
    let server = tokio::spawn(async move {
        let (req, send) = handle.next_request().await.expect("a request");
        assert_eq!(req.method(), "PATCH");
        let uri = req.uri().to_string();
        assert_eq!(
            uri,
            format!(
                "/apis/fhirexport.dev/v1alpha1/namespaces/phi/epicexports/nightly/status?&force=true&fieldManager={FIELD_MANAGER}"
            )
        );
        assert_eq!(
            req.headers()["content-type"],
            "application/apply-patch+yaml"
        );
        let body = body_json(req).await;
        assert_eq!(body["apiVersion"], "fhirexport.dev/v1alpha1");
        assert_eq!(body["kind"], "EpicExport");
        assert_eq!(body["status"]["lastScheduleTime"], "2026-12-01T02:00:00Z");
        assert_eq!(
            body.as_object().unwrap().len(),
            3,
            "only apiVersion, kind and status: {body}"
        );
        let mut obj = serde_json::to_value(export()).unwrap();
        obj["status"] = body["status"].clone();
        send.send_response(respond(200, obj));
        handle
    });
    assert!(write_status(&client, &e, &status).await.unwrap());
    let mut handle = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap();

    // The same status again: no request.
    let mut same = e.clone();
    same.status = Some(status.clone());
    assert!(!write_status(&client, &same, &status).await.unwrap());
    let extra = tokio::time::timeout(Duration::from_millis(200), handle.next_request()).await;
    assert!(extra.is_err(), "no request for an unchanged status");
}

fn job_named(name: &str, owner_uid: &str) -> Value {
    let e = export();
    let mut job = serde_json::to_value(
        build_job(
            &e,
            &RunInputs {
                job_name: name.into(),
                scheduled_at: "2026-12-01T02:00:00Z".into(),
                since: None,
            },
            "img",
        )
        .unwrap(),
    )
    .unwrap();
    job["metadata"]["ownerReferences"][0]["uid"] = json!(owner_uid);
    job["metadata"]["creationTimestamp"] = json!("2026-12-01T02:00:01Z");
    job
}

#[tokio::test]
async fn an_existing_run_of_ours_is_adopted_on_409_and_a_foreign_one_stalls() {
    for (owner, adopted) in [("u-1", true), ("someone-else", false)] {
        let (client, mut handle) = client();
        let e = export();
        let job = serde_json::from_value(job_named("nightly-29401560", "u-1")).unwrap();
        let server = tokio::spawn(async move {
            let (req, send) = handle.next_request().await.unwrap();
            assert_eq!(req.method(), "POST");
            assert_eq!(req.uri().path(), "/apis/batch/v1/namespaces/phi/jobs");
            send.send_response(respond(
                409,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists", "code": 409, "message": "jobs.batch \"nightly-29401560\" already exists"}),
            ));
            let (req, send) = handle.next_request().await.unwrap();
            assert_eq!(req.method(), "GET");
            assert_eq!(
                req.uri().path(),
                "/apis/batch/v1/namespaces/phi/jobs/nightly-29401560"
            );
            send.send_response(respond(200, job_named("nightly-29401560", owner)));
        });
        let result = start_run(&client, &e, &[], &[], Some(job), jiff::Timestamp::now()).await;
        server.await.unwrap();
        match result {
            Ok((runs, Some(Started::Adopted))) if adopted => {
                assert_eq!(runs.len(), 1);
                assert_eq!(runs[0].name, "nightly-29401560");
            }
            Err(ApplyError::Spec(e)) if !adopted => {
                assert_eq!(e.reason, "JobNameTaken");
                assert!(e.message.contains("nightly-29401560"), "{e}");
            }
            other => panic!("owner {owner}: unexpected {other:?}"),
        }
    }
}

/// A Job the API server refuses as invalid (a value the CRD let through) is the user's to fix: a
/// `JobRejected` spec error with the server's reason, made once, not a reconcile error retried forever.
#[tokio::test]
async fn a_job_the_api_server_refuses_is_a_spec_problem() {
    let (client, mut handle) = client();
    let e = export();
    let job = serde_json::from_value(job_named("nightly-29401560", "u-1")).unwrap();
    let server = tokio::spawn(async move {
        let (req, send) = handle.next_request().await.unwrap();
        assert_eq!(req.method(), "POST");
        send.send_response(respond(
            422,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Invalid", "code": 422,
                   "message": format!("Job.batch \"nightly-29401560\" is invalid: spec.template.spec.volumes[2].persistentVolumeClaim.claimName: Invalid value: \"Exports\": {}", "x".repeat(2000))}),
        ));
        tokio::time::timeout(Duration::from_millis(200), handle.next_request())
            .await
            .is_err()
    });
    let result = start_run(&client, &e, &[], &[], Some(job), jiff::Timestamp::now()).await;
    assert!(server.await.unwrap(), "one request, no retry");
    match result {
        Err(ApplyError::Spec(e)) => {
            assert_eq!((e.reason, e.field.as_str()), ("JobRejected", "spec.job"));
            assert!(e.message.contains("claimName"), "{e}");
            assert!(
                e.message.len() < 1000,
                "shortened: {} bytes",
                e.message.len()
            );
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn dereference_reads_only_what_the_export_refers_to() {
    let (client, mut handle) = client();
    let e = export();
    let key =
        epic_export::auth::keys::SigningKey::generate(epic_export::auth::keys::Algorithm::ES384)
            .unwrap();
    let pem = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(key.to_pkcs8_pem().unwrap())
    };
    let stored = pem.clone();
    let server = tokio::spawn(async move {
        let pem = stored;
        let mut seen = Vec::new();
        for _ in 0..3 {
            let (req, send) = handle.next_request().await.unwrap();
            let uri = req.uri().to_string();
            seen.push(format!("{} {uri}", req.method()));
            let body = if uri.contains("/secrets/epic-key") {
                json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "epic-key"}, "data": {"private.pem": pem}})
            } else if uri.contains("/configmaps/roster") {
                json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "roster"}, "data": {"other.csv": "x"}})
            } else {
                json!({"apiVersion": "batch/v1", "kind": "JobList", "metadata": {"resourceVersion": "5"}, "items": []})
            };
            send.send_response(respond(200, body));
        }
        seen
    });
    let observed = dereference(&client, &e).await.unwrap();
    let seen = server.await.unwrap();
    assert_eq!(
        seen,
        vec![
            "GET /api/v1/namespaces/phi/secrets/epic-key",
            "GET /api/v1/namespaces/phi/configmaps/roster",
            "GET /apis/batch/v1/namespaces/phi/jobs?&labelSelector=fhirexport.dev%2Fexport%3Dnightly",
        ]
    );
    use epic_export::operator::controller::model::RefCheck;
    assert_eq!(observed.references[0].check, RefCheck::Present);
    assert_eq!(
        observed.references[1].check,
        RefCheck::KeyMissing {
            keys: vec!["other.csv".into()]
        }
    );
    // Of the key only its public half is kept: the public JWK, for status.publicKeys.
    let keys = observed.keys.as_ref().unwrap();
    assert_eq!(keys.kids.active, key.kid());
    assert_eq!(
        serde_json::to_value(&keys.public).unwrap(),
        serde_json::json!({"keys": [key.public_jwk()]})
    );
    assert!(
        !format!("{observed:?}").contains(&pem[20..60]),
        "no key material kept"
    );
}

/// A rotation step reads the key Secret, and replaces it with the resourceVersion it read (so a
/// concurrent change is never overwritten); a 403 becomes a message saying how to allow it, and a
/// Secret that changed since the plan is left alone.
#[tokio::test]
async fn a_key_change_replaces_the_secret_with_its_resource_version_and_403_explains() {
    use base64::Engine;
    use epic_export::auth::keys::{Algorithm, SigningKey};
    use epic_export::operator::controller::apply::{KeyWrite, change_key};
    use epic_export::operator::key_secret::{KeyChange, KeyKids};

    let key = SigningKey::generate(Algorithm::ES256).unwrap();
    let pem = base64::engine::general_purpose::STANDARD.encode(key.to_pkcs8_pem().unwrap());
    let secret = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "epic-key", "namespace": "phi", "resourceVersion": "41"},
        "data": {"private.pem": pem}});
    let expected = KeyKids {
        active: key.kid().to_owned(),
        ..KeyKids::default()
    };
    for put_status in [200, 403] {
        let (client, mut handle) = client();
        let secret = secret.clone();
        let server = tokio::spawn(async move {
            let (req, send) = handle.next_request().await.expect("GET");
            assert_eq!(req.method(), "GET");
            assert_eq!(req.uri().path(), "/api/v1/namespaces/phi/secrets/epic-key");
            send.send_response(respond(200, secret.clone()));
            let (req, send) = handle.next_request().await.expect("PUT");
            assert_eq!(req.method(), "PUT");
            assert_eq!(req.uri().path(), "/api/v1/namespaces/phi/secrets/epic-key");
            let body = body_json(req).await;
            assert_eq!(body["metadata"]["resourceVersion"], "41");
            let mut keys: Vec<&String> = body["data"].as_object().unwrap().keys().collect();
            keys.sort();
            assert_eq!(keys, ["next-private.pem", "private.pem"]);
            assert_eq!(body["data"]["private.pem"], secret["data"]["private.pem"]);
            let reply = if put_status == 200 {
                body
            } else {
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403,
                    "reason": "Forbidden", "message": "secrets \"epic-key\" is forbidden"})
            };
            send.send_response(respond(put_status, reply));
        });
        let mut e = export();
        e.spec.auth.rotation = Some(Default::default());
        let outcome = change_key(&client, &e, &expected, &KeyChange::AddNext)
            .await
            .unwrap();
        server.await.unwrap();
        match put_status {
            200 => assert_eq!(outcome, KeyWrite::Written),
            _ => match outcome {
                KeyWrite::Refused(why) => {
                    assert!(
                        why.contains("update") && why.contains("keyRotation.enabled=true"),
                        "{why}"
                    )
                }
                other => panic!("{other:?}"),
            },
        }
    }

    // The Secret holds other keys than planned (someone rotated by hand): no write.
    let (client, mut handle) = client();
    let server = tokio::spawn(async move {
        let (_, send) = handle.next_request().await.expect("GET");
        send.send_response(respond(200, secret));
        assert!(
            tokio::time::timeout(Duration::from_millis(300), handle.next_request())
                .await
                .is_err(),
            "no write"
        );
    });
    let stale = KeyKids {
        active: "another-kid".into(),
        ..KeyKids::default()
    };
    assert_eq!(
        change_key(&client, &export(), &stale, &KeyChange::AddNext)
            .await
            .unwrap(),
        KeyWrite::Stale
    );
    server.await.unwrap();
}

/// With `spec.output.url` and `credentialsSecretRef`, the credentials Secret is read by name too: it
/// must exist (else the run's pod would wait forever for it) and hold a variable the URL's client
/// reads; only its key names are kept.
#[tokio::test]
async fn dereference_checks_the_object_store_credentials_secret_by_name() {
    use epic_export::operator::controller::model::RefCheck;
    let mut e = export();
    e.spec.output = serde_json::from_value(json!({
        "url": "s3://phi-exports/epic",
        "credentialsSecretRef": {"name": "s3-credentials"},
    }))
    .unwrap();
    let secret = |data: Value| json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-credentials"}, "data": data});
    let not_found = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "secrets \"s3-credentials\" not found"});
    // "c2VjcmV0" is base64 of "secret".
    let cases = [
        (
            Some(secret(
                json!({"AWS_ACCESS_KEY_ID": "c2VjcmV0", "AWS_SECRET_ACCESS_KEY": "c2VjcmV0"}),
            )),
            RefCheck::Present,
        ),
        (
            Some(secret(
                json!({"access_key": "c2VjcmV0", "AZURE_STORAGE_ACCOUNT_KEY": "c2VjcmV0"}),
            )),
            RefCheck::NoVariables {
                prefix: "AWS_",
                keys: vec!["AZURE_STORAGE_ACCOUNT_KEY".into(), "access_key".into()],
            },
        ),
        (None, RefCheck::Missing),
    ];
    for (stored, expected) in cases {
        let (client, mut handle) = client();
        let not_found = not_found.clone();
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..4 {
                let (req, send) = handle.next_request().await.unwrap();
                let uri = req.uri().to_string();
                seen.push(format!("{} {uri}", req.method()));
                let (code, body) = if uri.contains("/secrets/s3-credentials") {
                    match &stored {
                        Some(s) => (200, s.clone()),
                        None => (404, not_found.clone()),
                    }
                } else if uri.contains("/secrets/epic-key") {
                    (404, not_found.clone())
                } else if uri.contains("/configmaps/roster") {
                    (
                        200,
                        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "roster"}, "data": {"roster.csv": "x"}}),
                    )
                } else {
                    (
                        200,
                        json!({"apiVersion": "batch/v1", "kind": "JobList", "metadata": {"resourceVersion": "5"}, "items": []}),
                    )
                };
                send.send_response(respond(code, body));
            }
            seen
        });
        let observed = dereference(&client, &e).await.unwrap();
        let seen = server.await.unwrap();
        assert_eq!(
            seen,
            vec![
                "GET /api/v1/namespaces/phi/secrets/epic-key",
                "GET /api/v1/namespaces/phi/secrets/s3-credentials",
                "GET /api/v1/namespaces/phi/configmaps/roster",
                "GET /apis/batch/v1/namespaces/phi/jobs?&labelSelector=fhirexport.dev%2Fexport%3Dnightly",
            ]
        );
        let credentials = observed
            .references
            .iter()
            .find(|r| r.field == "spec.output.credentialsSecretRef")
            .unwrap();
        assert_eq!(credentials.name, "s3-credentials");
        assert_eq!(credentials.check, expected);
        assert!(
            !format!("{observed:?}").contains("c2VjcmV0")
                && !format!("{observed:?}").contains("\"secret\""),
            "no credential values kept"
        );
    }
}
