//! `output.url`: where a run lands, checked before anything is written, and the object store client
//! for it, built from the environment's credentials.

use std::path::PathBuf;
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::path::Path as ObjectPath;

/// Which cloud an object URL names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cloud {
    /// `s3://`: Amazon S3 and S3-compatible stores (MinIO, Ceph, ...).
    S3,
    /// `az://`: Azure Blob Storage.
    Azure,
    /// `gs://`: Google Cloud Storage.
    Gcs,
}

impl Cloud {
    pub fn scheme(self) -> &'static str {
        match self {
            Cloud::S3 => "s3",
            Cloud::Azure => "az",
            Cloud::Gcs => "gs",
        }
    }

    /// What credentials are called, for messages.
    pub fn credentials_hint(self) -> &'static str {
        match self {
            Cloud::S3 => "AWS_* (or the pod's IAM role)",
            Cloud::Azure => "AZURE_* (or the managed identity)",
            Cloud::Gcs => "GOOGLE_* (or the workload identity)",
        }
    }

    /// The environment variables this cloud's client reads (the prefix), for messages.
    fn env_prefix(self) -> &'static str {
        match self {
            Cloud::S3 => "AWS_",
            Cloud::Azure => "AZURE_",
            Cloud::Gcs => "GOOGLE_",
        }
    }
}

/// A bucket (or container) and a prefix in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectLocation {
    pub cloud: Cloud,
    pub bucket: String,
    /// The folder inside the bucket (may be empty).
    pub prefix: ObjectPath,
    /// An S3-compatible store's (or an emulator's) endpoint.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Plain http to the endpoint (loopback test servers only).
    pub allow_http: bool,
}

/// Where a run goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutputTarget {
    Local(PathBuf),
    Object(ObjectLocation),
}

/// What is wrong with `output.url` (or `endpoint`, `region`), and how to write it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocationError {
    #[error(
        "{0:?} is not a storage URL: write s3://bucket/prefix, az://container/prefix, gs://bucket/prefix or file:///path"
    )]
    NotUrl(String),
    #[error("{0:?}: the scheme must be s3, az, gs or file")]
    Scheme(String),
    #[error("{url:?}: {bucket:?} is not a valid {what} name ({rule})")]
    Bucket {
        url: String,
        bucket: String,
        what: &'static str,
        rule: &'static str,
    },
    #[error("{0:?}: the prefix must not contain empty segments, `.` or `..`")]
    Prefix(String),
    #[error(
        "{0:?} carries credentials, a query or a fragment: remove them (credentials come from the environment)"
    )]
    Extra(String),
    #[error("endpoint {0:?} is not an http(s) URL without a path, query or credentials")]
    Endpoint(String),
    #[error("endpoint {0:?}: plain http is only for a loopback test server; use https")]
    InsecureEndpoint(String),
    #[error(
        "endpoint and region are for s3:// (and endpoint for a test server of az:// or gs://), not for a local folder"
    )]
    LocalOptions,
}

/// `url` with any `user:password@` replaced by `…@`, for messages.
fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let authority_end = rest.find('/').unwrap_or(rest.len());
            match rest[..authority_end].rfind('@') {
                Some(at) => format!("{scheme}://…@{}", &rest[at + 1..]),
                None => url.to_owned(),
            }
        }
        None => url.to_owned(),
    }
}

/// Parses `output.url` with its `endpoint` and `region`.
pub fn parse_output_url(
    url: &str,
    endpoint: Option<&str>,
    region: Option<&str>,
) -> Result<OutputTarget, LocationError> {
    let redacted = redact(url.trim());
    let url = redacted.as_str();
    if !url.contains("://") {
        if endpoint.is_some() || region.is_some() {
            return Err(LocationError::LocalOptions);
        }
        return Ok(OutputTarget::Local(PathBuf::from(url)));
    }
    let parsed = url::Url::parse(url).map_err(|_| LocationError::NotUrl(url.to_owned()))?;
    if !parsed.username().is_empty()
        || parsed.password().is_some()
        || parsed.query().is_some()
        || parsed.fragment().is_some()
    {
        return Err(LocationError::Extra(url.to_owned()));
    }
    let cloud = match parsed.scheme() {
        "file" => {
            if endpoint.is_some() || region.is_some() {
                return Err(LocationError::LocalOptions);
            }
            let path = parsed
                .to_file_path()
                .map_err(|()| LocationError::NotUrl(url.to_owned()))?;
            return Ok(OutputTarget::Local(path));
        }
        "s3" => Cloud::S3,
        "az" => Cloud::Azure,
        "gs" => Cloud::Gcs,
        _ => return Err(LocationError::Scheme(url.to_owned())),
    };
    let bucket = parsed.host_str().unwrap_or_default().to_owned();
    check_bucket(cloud, &bucket).map_err(|(what, rule)| LocationError::Bucket {
        url: url.to_owned(),
        bucket: bucket.clone(),
        what,
        rule,
    })?;
    // The URL parser resolves `.` and `..`: look at the prefix as written.
    let written = url.split_once("://").map_or("", |(_, rest)| rest);
    let written_segments: Vec<&str> = written.trim_end_matches('/').split('/').skip(1).collect();
    if written_segments
        .iter()
        .any(|s| s.is_empty() || *s == "." || *s == "..")
    {
        return Err(LocationError::Prefix(url.to_owned()));
    }
    let raw_prefix = parsed.path().trim_matches('/');
    let segments: Vec<&str> = if raw_prefix.is_empty() {
        Vec::new()
    } else {
        raw_prefix.split('/').collect()
    };
    if segments
        .iter()
        .any(|s| s.is_empty() || *s == "." || *s == ".." || s.contains('%'))
    {
        return Err(LocationError::Prefix(url.to_owned()));
    }
    let prefix = ObjectPath::from_iter(segments);
    let (endpoint, allow_http) = match endpoint.map(str::trim) {
        None | Some("") => (None, false),
        Some(e) => {
            let u = url::Url::parse(e).map_err(|_| LocationError::Endpoint(redact(e)))?;
            if !matches!(u.scheme(), "http" | "https")
                || u.host_str().is_none()
                || !u.username().is_empty()
                || u.password().is_some()
                || u.query().is_some()
                || !matches!(u.path(), "" | "/")
            {
                return Err(LocationError::Endpoint(redact(e)));
            }
            let http = u.scheme() == "http";
            if http && !u.host_str().is_some_and(crate::trust::is_loopback_host) {
                return Err(LocationError::InsecureEndpoint(e.to_owned()));
            }
            (Some(e.trim_end_matches('/').to_owned()), http)
        }
    };
    Ok(OutputTarget::Object(ObjectLocation {
        cloud,
        bucket,
        prefix,
        endpoint,
        region: region
            .map(|r| r.trim().to_owned())
            .filter(|r| !r.is_empty()),
        allow_http,
    }))
}

/// The naming rules of each cloud's buckets (a wrong name fails early instead of at the first upload).
fn check_bucket(cloud: Cloud, name: &str) -> Result<(), (&'static str, &'static str)> {
    let ok_chars = |extra: &[u8]| {
        name.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || extra.contains(&b))
    };
    let edges = name
        .bytes()
        .next()
        .zip(name.bytes().last())
        .is_some_and(|(a, z)| a.is_ascii_alphanumeric() && z.is_ascii_alphanumeric());
    let len = (3..=63).contains(&name.len());
    match cloud {
        Cloud::S3 if len && edges && ok_chars(b"-.") && !name.contains("..") => Ok(()),
        Cloud::S3 => Err((
            "S3 bucket",
            "3-63 lowercase letters, digits, '-' and '.', starting and ending with a letter or digit",
        )),
        Cloud::Azure if len && edges && ok_chars(b"-") && !name.contains("--") => Ok(()),
        Cloud::Azure => Err((
            "Azure container",
            "3-63 lowercase letters, digits and single '-', starting and ending with a letter or digit",
        )),
        Cloud::Gcs if (3..=222).contains(&name.len()) && edges && ok_chars(b"-_.") => Ok(()),
        Cloud::Gcs => Err((
            "Cloud Storage bucket",
            "3-63 lowercase letters, digits, '-', '_' and '.', starting and ending with a letter or digit",
        )),
    }
}

/// The cloud's variables with `*_ALLOW_HTTP` dropped unless every endpoint they name is a loopback
/// test server: a variable must not turn uploads of PHI into plain http to a real host (the config's
/// `endpoint` obeys the same rule).
fn plain_http_only_to_loopback(vars: Vec<(String, String)>) -> Vec<(String, String)> {
    const ENDPOINTS: [&str; 5] = [
        "AWS_ENDPOINT",
        "AWS_ENDPOINT_URL",
        "AZURE_STORAGE_ENDPOINT",
        "AZURE_ENDPOINT",
        "GOOGLE_BASE_URL",
    ];
    let named: Vec<&str> = vars
        .iter()
        .filter(|(k, _)| ENDPOINTS.contains(&k.as_str()))
        .map(|(_, v)| v.as_str())
        .collect();
    let loopback_only = !named.is_empty()
        && named.iter().all(|v| {
            url::Url::parse(v)
                .ok()
                .and_then(|u| u.host_str().map(crate::trust::is_loopback_host))
                .unwrap_or(false)
        });
    if loopback_only {
        return vars;
    }
    vars.into_iter()
        .filter(|(k, v)| {
            let drop = k.ends_with("_ALLOW_HTTP");
            if drop && v.eq_ignore_ascii_case("true") {
                tracing::warn!("ignoring {k}: plain http is only for a loopback test server");
            }
            !drop
        })
        .collect()
}

/// Why no client could be made for a location.
#[derive(Debug, thiserror::Error)]
#[error(
    "{url}: cannot set up the {cloud} client: {message} (credentials are read from the {prefix}* environment variables or the platform's identity)"
)]
pub struct ConnectError {
    pub url: String,
    pub cloud: &'static str,
    pub prefix: &'static str,
    pub message: String,
}

impl ObjectLocation {
    /// The location as a URL, e.g. `s3://bucket/prefix` (no credentials: there are none in it).
    pub fn url(&self) -> String {
        if self.prefix.as_ref().is_empty() {
            format!("{}://{}", self.cloud.scheme(), self.bucket)
        } else {
            format!("{}://{}/{}", self.cloud.scheme(), self.bucket, self.prefix)
        }
    }

    /// A client for the bucket, with credentials from the process environment.
    pub fn connect(&self) -> Result<Arc<dyn ObjectStore>, ConnectError> {
        self.connect_with(std::env::vars())
    }

    /// A client for the bucket, with credentials from `vars` (name, value) as the cloud's tools read
    /// them: `AWS_*` for S3, `AZURE_*` for Azure, `GOOGLE_*` for Cloud Storage.
    pub fn connect_with(
        &self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Arc<dyn ObjectStore>, ConnectError> {
        let prefix = self.cloud.env_prefix();
        let vars = plain_http_only_to_loopback(
            vars.into_iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .collect(),
        );
        let fail = |e: object_store::Error| ConnectError {
            url: self.url(),
            cloud: match self.cloud {
                Cloud::S3 => "S3",
                Cloud::Azure => "Azure Blob Storage",
                Cloud::Gcs => "Cloud Storage",
            },
            prefix,
            message: super::describe(&e),
        };
        match self.cloud {
            Cloud::S3 => {
                use object_store::aws::AmazonS3Builder;
                let mut b = AmazonS3Builder::new();
                for (k, v) in vars {
                    if let Ok(key) = k.to_ascii_lowercase().parse() {
                        b = b.with_config(key, v);
                    }
                }
                b = b.with_bucket_name(&self.bucket);
                if let Some(r) = &self.region {
                    b = b.with_region(r);
                }
                if let Some(e) = &self.endpoint {
                    b = b.with_endpoint(e).with_allow_http(self.allow_http);
                }
                Ok(Arc::new(b.build().map_err(fail)?))
            }
            Cloud::Azure => {
                use object_store::azure::MicrosoftAzureBuilder;
                let mut b = MicrosoftAzureBuilder::new();
                for (k, v) in vars {
                    if let Ok(key) = k.to_ascii_lowercase().parse() {
                        b = b.with_config(key, v);
                    }
                }
                b = b.with_container_name(&self.bucket);
                if let Some(e) = &self.endpoint {
                    b = b.with_endpoint(e.clone()).with_allow_http(self.allow_http);
                }
                Ok(Arc::new(b.build().map_err(fail)?))
            }
            Cloud::Gcs => {
                use object_store::gcp::GoogleCloudStorageBuilder;
                let mut b = GoogleCloudStorageBuilder::new();
                for (k, v) in vars {
                    if let Ok(key) = k.to_ascii_lowercase().parse() {
                        b = b.with_config(key, v);
                    }
                }
                b = b.with_bucket_name(&self.bucket);
                if let Some(e) = &self.endpoint {
                    b = b.with_base_url(e);
                }
                Ok(Arc::new(b.build().map_err(fail)?))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(url: &str) -> ObjectLocation {
        match parse_output_url(url, None, None).unwrap() {
            OutputTarget::Object(o) => o,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn urls_of_each_cloud() {
        let s3 = object("s3://phi-exports/epic/nightly/");
        assert_eq!((s3.cloud, s3.bucket.as_str()), (Cloud::S3, "phi-exports"));
        assert_eq!(s3.prefix.as_ref(), "epic/nightly");
        assert_eq!(s3.url(), "s3://phi-exports/epic/nightly");
        assert_eq!(object("az://exports").prefix.as_ref(), "");
        assert_eq!(object("gs://my_bucket.example/x").cloud, Cloud::Gcs);
        assert_eq!(
            parse_output_url("file:///srv/exports", None, None).unwrap(),
            OutputTarget::Local("/srv/exports".into())
        );
        assert_eq!(
            parse_output_url("./out", None, None).unwrap(),
            OutputTarget::Local("./out".into())
        );
        let minio = parse_output_url(
            "s3://b-1/p",
            Some("http://127.0.0.1:9000/"),
            Some("us-east-1"),
        );
        match minio.unwrap() {
            OutputTarget::Object(o) => {
                assert_eq!(o.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
                assert!(o.allow_http);
                assert_eq!(o.region.as_deref(), Some("us-east-1"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn mistakes_are_named() {
        let err = |u: &str, e: Option<&str>| parse_output_url(u, e, None).unwrap_err().to_string();
        assert!(err("ftp://b/p", None).contains("s3, az, gs or file"));
        assert!(err("s3://Bad_Bucket/p", None).contains("S3 bucket"));
        assert!(err("az://a--b/p", None).contains("Azure container"));
        assert!(err("s3://bucket/a/../b", None).contains("prefix"));
        assert!(err("s3://bucket//b", None).contains("prefix"));
        assert!(err("s3://key:secret@bucket/p", None).contains("credentials"));
        assert!(!err("s3://key:secret@bucket/p", None).contains("secret"));
        assert!(!err("s3://key:secret@Bad/p", None).contains("secret"));
        assert!(err("s3://bucket/p?x=1", None).contains("query"));
        assert!(err("s3://bucket/p", Some("http://minio.example.org")).contains("loopback"));
        assert!(err("s3://bucket/p", Some("https://h/path")).contains("endpoint"));
        assert!(err("./out", Some("https://h")).contains("not for a local folder"));
    }

    #[test]
    fn allow_http_from_the_environment_only_for_loopback_endpoints() {
        let vars = |endpoint: &str| {
            vec![
                ("AWS_ENDPOINT_URL".to_owned(), endpoint.to_owned()),
                ("AWS_ALLOW_HTTP".to_owned(), "true".to_owned()),
                ("AWS_REGION".to_owned(), "us-east-1".to_owned()),
            ]
        };
        let kept = plain_http_only_to_loopback(vars("http://127.0.0.1:9000"));
        assert_eq!(kept.len(), 3);
        for endpoint in ["http://minio.example.org", "not a url"] {
            let kept = plain_http_only_to_loopback(vars(endpoint));
            assert!(
                kept.iter().all(|(k, _)| k != "AWS_ALLOW_HTTP"),
                "{endpoint}"
            );
            assert_eq!(kept.len(), 2);
        }
        let no_endpoint = vec![("GOOGLE_ALLOW_HTTP".to_owned(), "true".to_owned())];
        assert!(plain_http_only_to_loopback(no_endpoint).is_empty());
    }

    #[test]
    fn clients_are_built_from_the_environment() {
        let s3 = object("s3://bucket/p");
        let vars = [
            ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE"),
            ("AWS_SECRET_ACCESS_KEY", "not-a-real-secret"),
            ("AWS_REGION", "us-west-2"),
            ("HOME", "/root"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        assert!(s3.connect_with(vars).is_ok());
        // Azure needs an account: the error says where credentials come from.
        let az = object("az://container/p");
        let e = az
            .connect_with(Vec::new())
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("az://container/p") && e.contains("AZURE_"),
            "{e}"
        );
    }
}
