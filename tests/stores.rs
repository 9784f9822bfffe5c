//! The object-store test servers (tests/support/stores.rs) are real and object_store's clients work
//! against them: S3 (moto), Azure Blob (Azurite), GCS (object_store's GCS client against moto's XML API).
//! Each test starts its own server. Needs `eval "$(scripts/stores.sh)"` (scripts/test.sh does it).

#[path = "support/stores.rs"]
mod stores;

use std::sync::Arc;

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutPayload, WriteMultipart};
use stores::{AzureServer, GcsServer, S3Server};

const PART: usize = 5 * 1024 * 1024;

/// Deterministic bytes that are not a repeating pattern (xorshift).
fn data(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Put, multipart put (3 parts of 5 MiB, the last shorter), get, list by prefix, conditional create
/// (when `create_is_enforced`), delete.
async fn exercise(store: Arc<dyn ObjectStore>, create_is_enforced: bool) {
    let small = Path::from("run-1/Patient.ndjson");
    store
        .put(
            &small,
            PutPayload::from_static(b"{\"resourceType\":\"Patient\"}\n"),
        )
        .await
        .unwrap();
    let got = store.get(&small).await.unwrap().bytes().await.unwrap();
    assert_eq!(&got[..], b"{\"resourceType\":\"Patient\"}\n");

    let big = Path::from("run-1/Observation.ndjson");
    let want = data(2 * PART + PART / 5);
    let mut upload =
        WriteMultipart::new_with_chunk_size(store.put_multipart(&big).await.unwrap(), PART);
    for chunk in want.chunks(1024 * 1024 + 7) {
        upload.write(chunk);
    }
    upload.finish().await.unwrap();
    let meta = store.head(&big).await.unwrap();
    assert_eq!(meta.size, want.len() as u64);
    let got = store.get(&big).await.unwrap().bytes().await.unwrap();
    assert!(
        got[..] == want[..],
        "the multipart object reads back byte-equal"
    );

    store
        .put(
            &Path::from("run-2/Patient.ndjson"),
            PutPayload::from_static(b"x"),
        )
        .await
        .unwrap();
    let mut listed: Vec<String> = store
        .list(Some(&Path::from("run-1")))
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap();
    listed.sort();
    assert_eq!(
        listed,
        ["run-1/Observation.ndjson", "run-1/Patient.ndjson"],
        "list by prefix"
    );

    let marker = Path::from("run-1/_SUCCESS");
    store
        .put_opts(
            &marker,
            PutPayload::from_static(b"1"),
            PutMode::Create.into(),
        )
        .await
        .unwrap();
    if create_is_enforced {
        let again = store
            .put_opts(
                &marker,
                PutPayload::from_static(b"2"),
                PutMode::Create.into(),
            )
            .await;
        assert!(
            matches!(again, Err(object_store::Error::AlreadyExists { .. })),
            "a second create-only put is refused: {again:?}"
        );
        let got = store.get(&marker).await.unwrap().bytes().await.unwrap();
        assert_eq!(&got[..], b"1");
    }

    store.delete(&small).await.unwrap();
    let gone = store.get(&small).await;
    assert!(
        matches!(gone, Err(object_store::Error::NotFound { .. })),
        "deleted: {gone:?}"
    );
    let left: Vec<_> = store
        .list(Some(&Path::from("run-1")))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(left.len(), 2, "Observation.ndjson and _SUCCESS remain");
}

/// A put and a list through a store built only from the handle's environment variables.
async fn round_trip_via_env(store: Arc<dyn ObjectStore>) {
    let path = Path::from("from-env/hello.txt");
    store
        .put(&path, PutPayload::from_static(b"hello"))
        .await
        .unwrap();
    let got = store.get(&path).await.unwrap().bytes().await.unwrap();
    assert_eq!(&got[..], b"hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_put_multipart_get_list_delete() {
    let s3 = S3Server::start().await;
    exercise(s3.store(), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_env_credentials_work_and_a_wrong_secret_is_refused() {
    let s3 = S3Server::start().await;
    let env = s3.env();
    let store = stores::s3_builder_from(&env)
        .with_bucket_name(&s3.bucket)
        .build()
        .unwrap();
    round_trip_via_env(Arc::new(store)).await;

    let wrong = s3
        .builder()
        .with_secret_access_key("not-the-secret")
        .build()
        .unwrap();
    let err = wrong
        .put(&Path::from("x"), PutPayload::from_static(b"x"))
        .await
        .unwrap_err();
    assert!(
        format!("{err}").contains("SignatureDoesNotMatch"),
        "wrong secret: {err}"
    );
    let unknown = s3
        .builder()
        .with_access_key_id("AKIAUNKNOWNUNKNOWN00")
        .build()
        .unwrap();
    assert!(
        unknown
            .head(&Path::from("from-env/hello.txt"))
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_put_multipart_get_list_delete() {
    let azure = AzureServer::start().await;
    exercise(azure.store(), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_env_credentials_work_and_a_wrong_key_is_refused() {
    let azure = AzureServer::start().await;
    let store = stores::azure_builder_from(&azure.env()).build().unwrap();
    round_trip_via_env(Arc::new(store)).await;

    use base64::Engine;
    let other_key = base64::engine::general_purpose::STANDARD.encode([7u8; 64]);
    let wrong = azure.builder().with_access_key(other_key).build().unwrap();
    let err = wrong
        .put(&Path::from("x"), PutPayload::from_static(b"x"))
        .await
        .unwrap_err();
    assert!(format!("{err}").contains("403"), "wrong key: {err}");
}

/// moto ignores GCS's `x-goog-if-generation-match`, so create-only puts are not checked here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcs_put_multipart_get_list_delete() {
    let gcs = GcsServer::start().await;
    exercise(gcs.store(), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcs_env_credentials_work() {
    let gcs = GcsServer::start().await;
    let store = stores::gcs_builder_from(&gcs.env()).build().unwrap();
    round_trip_via_env(Arc::new(store)).await;
}

/// epic-export's own storage layer against the server: the URL parsed as `output.url`, the client
/// built from the environment variables only, an NDJSON object streamed gzip-compressed in parts, read
/// back whole with the SHA-256 of what was appended; a wrong secret fails naming the object, never the
/// secret.
/// `secret`: the variable with the secret, its right value and a wrong one.
async fn storage_layer(url: &str, env: Vec<(String, String)>, secret: Option<(&str, &str, &str)>) {
    use epic_export::storage::upload::Uploader;
    use epic_export::storage::{OutputTarget, parse_output_url};
    let scratch = tempfile::tempdir().unwrap();
    let uploader = |store| {
        Uploader::new(
            store,
            tokio::runtime::Handle::current(),
            PART,
            2,
            scratch.path().to_owned(),
        )
    };
    let OutputTarget::Object(location) = parse_output_url(url, None, None).unwrap() else {
        panic!("{url} is an object URL");
    };
    let store = location.connect_with(env.clone()).unwrap();
    let mut lines = Vec::new();
    for i in 0..150_000 {
        lines.extend_from_slice(
            format!(
                "{{\"resourceType\":\"Observation\",\"id\":\"o{i}\",\"value\":{}}}\n",
                i % 97
            )
            .as_bytes(),
        );
    }
    let path = location
        .prefix
        .clone()
        .join("run-1")
        .join("Observation.ndjson.gz");
    let (u, to, sent) = (uploader(store.clone()), path.clone(), lines.clone());
    let done = tokio::task::spawn_blocking(move || {
        let mut f = u.create(to, true).unwrap();
        for chunk in sent.chunks(256 * 1024) {
            f.append(chunk, 1).unwrap();
        }
        f.finish().unwrap()
    })
    .await
    .unwrap();
    let stored = store.get(&path).await.unwrap().bytes().await.unwrap();
    assert_eq!(stored.len() as u64, done.stored_bytes);
    let mut plain = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&stored[..]), &mut plain).unwrap();
    assert_eq!(plain, lines);
    let sha = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &lines);
    assert_eq!(done.sha256, epic_export::text::hex(sha.as_ref()));

    // Uncompressed and larger than two parts: a real multipart upload.
    let big = data(2 * PART + 1234);
    let path = location.prefix.clone().join("run-1").join("Big.ndjson");
    let (u, to, sent) = (uploader(store.clone()), path.clone(), big.clone());
    tokio::task::spawn_blocking(move || {
        let mut f = u.create(to, false).unwrap();
        for chunk in sent.chunks(1 << 20) {
            f.append(chunk, 0).unwrap();
        }
        f.finish().unwrap()
    })
    .await
    .unwrap();
    let got = store.get(&path).await.unwrap().bytes().await.unwrap();
    assert!(got[..] == big[..], "byte-equal after a multipart upload");

    if let Some((name, right, wrong_value)) = secret {
        let wrong: Vec<(String, String)> = env
            .into_iter()
            .map(|(k, v)| {
                if k == name {
                    (k, wrong_value.to_owned())
                } else {
                    (k, v)
                }
            })
            .collect();
        let store = location.connect_with(wrong).unwrap();
        let path = location.prefix.clone().join("run-2").join("Patient.ndjson");
        let (u, to) = (uploader(store), path.clone());
        let result = tokio::task::spawn_blocking(move || {
            let mut f = u.create(to, false)?;
            f.append(b"{}\n", 1)?;
            f.finish().map(|_| ())
        })
        .await
        .unwrap();
        let message = result.unwrap_err().to_string();
        assert!(message.contains("run-2/Patient.ndjson"), "{message}");
        assert!(
            !message.contains(wrong_value) && !message.contains(right),
            "{message}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_through_the_storage_layer() {
    let s3 = S3Server::start().await;
    let secret = s3.secret_access_key.clone();
    storage_layer(
        &s3.url("exports/nightly"),
        s3.env(),
        Some(("AWS_SECRET_ACCESS_KEY", &secret, "wrong-secret-0000")),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_through_the_storage_layer() {
    let az = AzureServer::start().await;
    let key = az.key.clone();
    // Azure keys are base64: a wrong one that decodes.
    let wrong = "d3Jvbmcta2V5LWZvci1henVyaXRlLXRlc3RzLXdyb25nLWtleS1mb3ItYXp1cml0ZQ==";
    storage_layer(
        &az.url("exports/nightly"),
        az.env(),
        Some(("AZURE_STORAGE_ACCOUNT_KEY", &key, wrong)),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcs_through_the_storage_layer() {
    let gs = GcsServer::start().await;
    storage_layer(&gs.url("exports/nightly"), gs.env(), None).await;
}

/// An export's runs in the bucket: `latest.json` only after the manifest, a killed run (objects
/// without a manifest) never named by it and removed by retention with the runs beyond `keepRuns`.
async fn runs_layer(store: Arc<dyn ObjectStore>) {
    use epic_export::storage::runs::ExportRuns;
    let runs = ExportRuns::new(store.clone(), &Path::from("epic/exports"), "nightly");
    assert_eq!(runs.latest().await.unwrap(), None);
    let put = |p: String| {
        let store = store.clone();
        async move {
            store
                .put(&Path::from(p), PutPayload::from_static(b"{}\n"))
                .await
                .unwrap();
        }
    };
    for id in ["20261101T020000Z", "20261102T020000Z", "20261102T020000Z-2"] {
        put(format!("epic/exports/nightly/{id}/Patient.ndjson")).await;
        put(format!(
            "epic/exports/nightly/{id}/errors/failed-requests.ndjson"
        ))
        .await;
        runs.publish(id, &[("summary.json", b"{}".to_vec())], b"{}".to_vec())
            .await
            .unwrap();
    }
    put("epic/exports/nightly/20261103T020000Z/Patient.ndjson".into()).await;
    let latest = runs.latest().await.unwrap().unwrap();
    assert_eq!(latest.run_id, "20261102T020000Z-2");
    assert!(store.head(&Path::from(latest.manifest)).await.is_ok());
    let removed = runs.remove_old_runs(1, None).await.unwrap();
    assert_eq!(
        removed,
        ["20261101T020000Z", "20261102T020000Z", "20261103T020000Z"]
    );
    let left: Vec<Path> = store
        .list(Some(&Path::from("epic/exports/nightly")))
        .map_ok(|m| m.location)
        .try_collect()
        .await
        .unwrap();
    let mut left: Vec<String> = left.iter().map(|p| p.to_string()).collect();
    left.sort();
    assert_eq!(
        left,
        [
            "epic/exports/nightly/20261102T020000Z-2/Patient.ndjson",
            "epic/exports/nightly/20261102T020000Z-2/errors/failed-requests.ndjson",
            "epic/exports/nightly/20261102T020000Z-2/manifest.json",
            "epic/exports/nightly/20261102T020000Z-2/summary.json",
            "epic/exports/nightly/latest.json",
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_in_s3_azure_and_gcs() {
    let (s3, az, gs) = tokio::join!(S3Server::start(), AzureServer::start(), GcsServer::start());
    runs_layer(s3.store()).await;
    runs_layer(az.store()).await;
    runs_layer(gs.store()).await;
}
