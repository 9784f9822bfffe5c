//! Object storage as a destination for runs: S3 (and S3-compatible stores), Azure Blob Storage and
//! Google Cloud Storage, named by a URL (`s3://bucket/prefix`, `az://container/prefix`,
//! `gs://bucket/prefix`; `file:///path` or a plain path is a local folder). Credentials never come
//! from the config: each cloud's client finds them the way the cloud's own tools do (environment
//! variables, web identity / IRSA, workload identity, instance metadata, managed identity).
//!
//! This module is the infrastructure only: parsing and checking the URL (`location`), connecting with
//! credentials from the environment, streaming one object as a multipart upload while counting and
//! hashing it (`upload`), and an export's runs in a bucket — publishing with `latest.json` after the
//! manifest, and retention (`runs`). Nothing here knows about FHIR.

pub mod location;
pub mod runs;
pub mod upload;

pub use location::{Cloud, LocationError, ObjectLocation, OutputTarget, parse_output_url};
pub use upload::{ObjectFile, UploadError};

/// An object store error as a message that names what failed but no credential: object store errors
/// can quote request URLs, whose query (a SAS token, a pre-signed signature) is cut off here.
pub fn describe(e: &object_store::Error) -> String {
    let text = e.to_string();
    let mut out = String::with_capacity(text.len());
    for word in text.split_inclusive(char::is_whitespace) {
        match word.find('?') {
            Some(i) if word.contains("://") => {
                out.push_str(&word[..i]);
                out.push_str("?…");
                if word.ends_with(char::is_whitespace) {
                    out.push(' ');
                }
            }
            _ => out.push_str(word),
        }
    }
    crate::text::shorten(&out, 600).into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn queries_of_urls_are_cut_from_messages() {
        let e = object_store::Error::Generic {
            store: "MicrosoftAzure",
            source:
                "request to https://acct.blob.core.windows.net/c/x?sv=2024&sig=SECRET failed: 403"
                    .into(),
        };
        let text = super::describe(&e);
        assert!(!text.contains("SECRET"), "{text}");
        assert!(
            text.contains("https://acct.blob.core.windows.net/c/x?…"),
            "{text}"
        );
        assert!(text.contains("403"), "{text}");
    }
}
