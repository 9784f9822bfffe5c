//! Real object-store servers on loopback for tests, one fresh process per call, killed on drop:
//! - S3: moto in server mode (`EPIC_EXPORT_TEST_STORE_PYTHON`, a Python with `moto[server]`), with
//!   signature checks on: the bucket and an IAM user with an allow-all policy are made before moto's
//!   `INITIAL_NO_AUTH_ACTION_COUNT` runs out, so every later request must be signed with that user's key.
//! - Azure Blob: Azurite (`EPIC_EXPORT_TEST_AZURITE`, its `azurite-blob`), which checks shared-key signatures.
//! - GCS: object_store's GCS client speaks GCS's XML API, which is S3-compatible; no registry GCS emulator
//!   serves it well enough (see scripts/stores.sh), so `GcsServer` is a moto server without auth, reached
//!   with `google_base_url` and a static bearer token.
//!
//! scripts/stores.sh installs both and prints the variables; scripts/test.sh sets them. Without them these
//! tests fail (they are never skipped).
#![allow(dead_code)]

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::{ClientOptions, ObjectStore};

/// Azurite's well-known development account and key.
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// The requests moto serves before it starts checking signatures: CreateUser, PutUserPolicy,
/// CreateAccessKey and CreateBucket (see `S3Server::start`).
const MOTO_SETUP_ACTIONS: u32 = 4;

fn required_env(name: &str, what: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: these tests need {what}; run scripts/test.sh, or `eval \"$(scripts/stores.sh)\"` \
             (it installs moto into target/store-venv and Azurite into target/azurite and prints the variables)"
        )
    })
}

fn store_python() -> String {
    required_env(
        "EPIC_EXPORT_TEST_STORE_PYTHON",
        "a Python with moto[server] (the S3 and GCS test servers)",
    )
}

fn azurite_blob() -> String {
    required_env(
        "EPIC_EXPORT_TEST_AZURITE",
        "Azurite's azurite-blob (the Azure Blob test server)",
    )
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A server process (killed on drop) with its own temp dir for data and its log.
pub struct Process {
    pub name: &'static str,
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: tokio::process::Child,
}

impl Process {
    async fn spawn(
        name: &'static str,
        port: u16,
        program: &str,
        configure: impl FnOnce(&mut tokio::process::Command, &Path),
    ) -> Process {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let mut cmd = tokio::process::Command::new(program);
        cmd.current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true);
        configure(&mut cmd, dir.path());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the {name} test server ({program}): {e}"));
        let mut process = Process {
            name,
            port,
            dir,
            child,
        };
        process.wait_until_listening().await;
        process
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    async fn wait_until_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "the {} test server exited ({status}) before listening on port {}:\n{}",
                    self.name,
                    self.port,
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the {} test server did not listen on port {} within 30 s:\n{}",
                self.name,
                self.port,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn start_moto(name: &'static str, auth: bool) -> Process {
    let python = store_python();
    let port = free_port();
    Process::spawn(name, port, &python, |cmd, _| {
        cmd.args(["-m", "moto.server", "-H", "127.0.0.1", "-p"])
            .arg(port.to_string());
        if auth {
            cmd.env(
                "INITIAL_NO_AUTH_ACTION_COUNT",
                MOTO_SETUP_ACTIONS.to_string(),
            );
        }
    })
    .await
}

/// Sends a setup request; panics with the server's answer unless it succeeds.
async fn expect_ok(what: &str, request: reqwest::RequestBuilder) -> String {
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    assert!(status.is_success(), "{what}: {status}: {body}");
    body
}

fn xml_value(xml: &str, tag: &str) -> String {
    let open = format!("<{tag}>");
    let start = xml
        .find(&open)
        .unwrap_or_else(|| panic!("no <{tag}> in {xml}"))
        + open.len();
    let end = start + xml[start..].find("</").unwrap();
    xml[start..end].to_owned()
}

/// S3 (moto) with a bucket and an IAM user's access key; requests with any other key are refused.
pub struct S3Server {
    /// `http://127.0.0.1:PORT` (path-style requests).
    pub endpoint: String,
    pub bucket: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub region: String,
    pub process: Process,
}

impl S3Server {
    pub async fn start() -> S3Server {
        let process = start_moto("S3 (moto)", true).await;
        let endpoint = format!("http://127.0.0.1:{}", process.port);
        let region = "us-east-1".to_owned();
        let bucket = "exports".to_owned();
        let http = reqwest::Client::new();
        let user = "epic-export-tests";
        // Before auth is on moto checks no signature; the credential scope only routes the request to IAM.
        let iam = |params: &[(&str, &str)]| {
            let mut form = vec![("Version", "2010-05-08"), ("UserName", user)];
            form.extend_from_slice(params);
            http.post(format!("{endpoint}/"))
                .header(
                    "authorization",
                    format!(
                        "AWS4-HMAC-SHA256 Credential=setup/20260101/{region}/iam/aws4_request, \
                         SignedHeaders=host, Signature=0"
                    ),
                )
                .form(&form)
        };
        expect_ok("moto CreateUser", iam(&[("Action", "CreateUser")])).await;
        let policy = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}"#;
        expect_ok(
            "moto PutUserPolicy",
            iam(&[
                ("Action", "PutUserPolicy"),
                ("PolicyName", "all"),
                ("PolicyDocument", policy),
            ]),
        )
        .await;
        let key = expect_ok(
            "moto CreateAccessKey",
            iam(&[("Action", "CreateAccessKey")]),
        )
        .await;
        expect_ok(
            "moto CreateBucket",
            http.put(format!("{endpoint}/{bucket}")),
        )
        .await;
        S3Server {
            access_key_id: xml_value(&key, "AccessKeyId"),
            secret_access_key: xml_value(&key, "SecretAccessKey"),
            endpoint,
            bucket,
            region,
            process,
        }
    }

    /// The variables the AWS tools (and `AmazonS3Builder::from_env`) read for this server and bucket.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", self.access_key_id.as_str()),
            ("AWS_SECRET_ACCESS_KEY", &self.secret_access_key),
            ("AWS_ENDPOINT_URL", &self.endpoint),
            ("AWS_REGION", &self.region),
            ("AWS_ALLOW_HTTP", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    /// `s3://BUCKET/PREFIX`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    pub fn builder(&self) -> AmazonS3Builder {
        AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_region(&self.region)
            .with_bucket_name(&self.bucket)
            .with_access_key_id(&self.access_key_id)
            .with_secret_access_key(&self.secret_access_key)
    }

    pub fn store(&self) -> Arc<dyn ObjectStore> {
        Arc::new(self.builder().build().unwrap())
    }
}

/// Azure Blob (Azurite, in memory) with a container; requests signed with another key are refused.
pub struct AzureServer {
    /// The account's blob endpoint, path-style: `http://127.0.0.1:PORT/devstoreaccount1`.
    pub endpoint: String,
    pub account: String,
    pub key: String,
    pub container: String,
    pub process: Process,
}

impl AzureServer {
    pub async fn start() -> AzureServer {
        let azurite = azurite_blob();
        let port = free_port();
        let process = Process::spawn("Azure Blob (Azurite)", port, &azurite, |cmd, _| {
            // In memory; the working directory (the temp dir) takes anything else it writes.
            cmd.args(["--blobHost", "127.0.0.1", "--blobPort"])
                .arg(port.to_string())
                .args([
                    "--inMemoryPersistence",
                    "--disableTelemetry",
                    "--skipApiVersionCheck",
                ]);
        })
        .await;
        let server = AzureServer {
            endpoint: format!("http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"),
            account: AZURITE_ACCOUNT.to_owned(),
            key: AZURITE_KEY.to_owned(),
            container: "exports".to_owned(),
            process,
        };
        server.create_container().await;
        server
    }

    /// Create Container, signed with the shared key (object_store has no call for it).
    async fn create_container(&self) {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let url = format!("{}/{}?restype=container", self.endpoint, self.container);
        let date = httpdate::fmt_http_date(std::time::SystemTime::now());
        let version = "2021-08-06";
        let path = url::Url::parse(&url).unwrap().path().to_owned();
        // Verb, then 11 empty standard headers (a zero Content-Length is signed as empty).
        let to_sign = format!(
            "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{}{path}\nrestype:container",
            self.account
        );
        let key = aws_lc_rs::hmac::Key::new(
            aws_lc_rs::hmac::HMAC_SHA256,
            &b64.decode(&self.key).unwrap(),
        );
        let signature = b64.encode(aws_lc_rs::hmac::sign(&key, to_sign.as_bytes()));
        expect_ok(
            "Azurite Create Container",
            reqwest::Client::new()
                .put(&url)
                .header("x-ms-date", date)
                .header("x-ms-version", version)
                .header("content-length", "0")
                .header(
                    "authorization",
                    format!("SharedKey {}:{signature}", self.account),
                ),
        )
        .await;
    }

    /// The variables `MicrosoftAzureBuilder::from_env` reads for this server and container. Azure's own
    /// tools use `AZURE_STORAGE_CONNECTION_STRING` instead: see `connection_string`.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AZURE_STORAGE_ACCOUNT_NAME", self.account.as_str()),
            ("AZURE_STORAGE_ACCOUNT_KEY", &self.key),
            ("AZURE_STORAGE_ENDPOINT", &self.endpoint),
            ("AZURE_CONTAINER_NAME", &self.container),
            ("AZURE_ALLOW_HTTP", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    /// The connection string Azure's SDKs and CLI take for this account.
    pub fn connection_string(&self) -> String {
        format!(
            "DefaultEndpointsProtocol=http;AccountName={};AccountKey={};BlobEndpoint={};",
            self.account, self.key, self.endpoint
        )
    }

    /// `az://CONTAINER/PREFIX`.
    pub fn url(&self, prefix: &str) -> String {
        format!("az://{}/{prefix}", self.container)
    }

    pub fn builder(&self) -> MicrosoftAzureBuilder {
        MicrosoftAzureBuilder::new()
            .with_endpoint(self.endpoint.clone())
            .with_allow_http(true)
            .with_account(&self.account)
            .with_access_key(&self.key)
            .with_container_name(&self.container)
    }

    pub fn store(&self) -> Arc<dyn ObjectStore> {
        Arc::new(self.builder().build().unwrap())
    }
}

/// GCS's XML API (served by moto, see the module doc) with a bucket, reached with a static bearer token
/// (moto checks none; it must only be non-empty, as moto parses the Authorization header).
pub struct GcsServer {
    /// `http://127.0.0.1:PORT`, the GCS base URL.
    pub endpoint: String,
    pub bucket: String,
    pub bearer_token: String,
    pub process: Process,
}

impl GcsServer {
    pub async fn start() -> GcsServer {
        let process = start_moto("GCS (moto, XML API)", false).await;
        let endpoint = format!("http://127.0.0.1:{}", process.port);
        let bucket = "exports".to_owned();
        expect_ok(
            "create the GCS bucket",
            reqwest::Client::new().put(format!("{endpoint}/{bucket}")),
        )
        .await;
        GcsServer {
            endpoint,
            bucket,
            bearer_token: "epic-export-test-token".to_owned(),
            process,
        }
    }

    /// The variables `GoogleCloudStorageBuilder::from_env` reads for this server and bucket. (A
    /// `GOOGLE_SERVICE_ACCOUNT` file with `gcs_base_url` and `disable_oauth` would do too against a GCS
    /// emulator, but it sends an empty bearer token, which moto's request routing cannot parse.)
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("GOOGLE_BASE_URL", self.endpoint.as_str()),
            ("GOOGLE_BEARER_TOKEN", &self.bearer_token),
            ("GOOGLE_BUCKET", &self.bucket),
            ("GOOGLE_ALLOW_HTTP", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    /// `gs://BUCKET/PREFIX`.
    pub fn url(&self, prefix: &str) -> String {
        format!("gs://{}/{prefix}", self.bucket)
    }

    pub fn builder(&self) -> GoogleCloudStorageBuilder {
        GoogleCloudStorageBuilder::new()
            .with_base_url(&self.endpoint)
            .with_bearer_token(&self.bearer_token)
            .with_client_options(ClientOptions::new().with_allow_http(true))
            .with_bucket_name(&self.bucket)
    }

    pub fn store(&self) -> Arc<dyn ObjectStore> {
        Arc::new(self.builder().build().unwrap())
    }
}

/// `AmazonS3Builder::from_env()` as it would be with exactly `vars` in the environment (AWS_* only),
/// without touching the process environment.
pub fn s3_builder_from(vars: &[(String, String)]) -> AmazonS3Builder {
    vars.iter()
        .filter(|(k, _)| k.starts_with("AWS_"))
        .fold(AmazonS3Builder::new(), |b, (k, v)| {
            match k.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() {
                Ok(key) => b.with_config(key, v),
                Err(_) => b,
            }
        })
}

/// `MicrosoftAzureBuilder::from_env()` with exactly `vars` (AZURE_* only).
pub fn azure_builder_from(vars: &[(String, String)]) -> MicrosoftAzureBuilder {
    vars.iter().filter(|(k, _)| k.starts_with("AZURE_")).fold(
        MicrosoftAzureBuilder::new(),
        |b, (k, v)| match k.to_ascii_lowercase().parse::<AzureConfigKey>() {
            Ok(key) => b.with_config(key, v),
            Err(_) => b,
        },
    )
}

/// `GoogleCloudStorageBuilder::from_env()` with exactly `vars` (GOOGLE_* only).
pub fn gcs_builder_from(vars: &[(String, String)]) -> GoogleCloudStorageBuilder {
    vars.iter().filter(|(k, _)| k.starts_with("GOOGLE_")).fold(
        GoogleCloudStorageBuilder::new(),
        |b, (k, v)| match k.to_ascii_lowercase().parse::<GoogleConfigKey>() {
            Ok(key) => b.with_config(key, v),
            Err(_) => b,
        },
    )
}
