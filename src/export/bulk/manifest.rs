//! The Bulk Data completion manifest, and which file URLs may be fetched with or without the token.
//!
//! `requiresAccessToken: true`: the token goes only to the FHIR server's origin and origins the config
//! trusts with it (`tokenHosts`). `false`: the token is never sent. A file on any other origin is
//! downloaded only when the config lists that origin (`fileHosts`), and never with the token.
//!
//! A file's `type` names a file of the run (`<Type>.ndjson`, `deleted/<Type>.ndjson`), so a type that
//! is not a FHIR type name (`^[A-Z][A-Za-z0-9]{0,63}$`) refuses the file: it is recorded as an error
//! and never becomes a path.

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub transaction_time: Option<String>,
    #[serde(default)]
    pub request: Option<String>,
    #[serde(default)]
    pub requires_access_token: bool,
    #[serde(default)]
    pub output: Vec<FileRef>,
    #[serde(default)]
    pub error: Vec<FileRef>,
    #[serde(default)]
    pub deleted: Vec<FileRef>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct FileRef {
    #[serde(rename = "type")]
    pub resource_type: String,
    pub url: String,
    #[serde(default)]
    pub count: Option<u64>,
}

/// Which list of the manifest a file came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Output,
    Error,
    Deleted,
}

impl Kind {
    /// The `resourceType` every line must have. Deleted entries are Bundles (Bulk Data IG STU2).
    pub fn line_type(self, resource_type: &str) -> &str {
        match self {
            Kind::Output => resource_type,
            Kind::Error => "OperationOutcome",
            Kind::Deleted => "Bundle",
        }
    }
}

/// One file to download.
#[derive(Clone, Debug)]
pub struct Download {
    pub kind: Kind,
    pub file: FileRef,
    /// Origins the token may be sent to for this file (empty: never).
    pub token_origins: Vec<String>,
}

/// Why a listed file is not downloaded.
#[derive(Debug, Clone)]
pub struct Refused {
    pub kind: Kind,
    pub file: FileRef,
    pub reason: String,
}

/// Sorts the manifest's files into downloads and refusals by the origin rules above.
pub fn plan_downloads(
    m: &Manifest,
    fhir_origin: &str,
    token_origins: &[String],
    file_origins: &[String],
) -> (Vec<Download>, Vec<Refused>) {
    let mut allowed_with_token = vec![fhir_origin.to_owned()];
    allowed_with_token.extend(token_origins.iter().cloned());
    let lists = [
        (Kind::Output, &m.output),
        (Kind::Error, &m.error),
        (Kind::Deleted, &m.deleted),
    ];
    let mut downloads = Vec::new();
    let mut refused = Vec::new();
    for (kind, files) in lists {
        for file in files.iter().cloned() {
            if !crate::trust::is_resource_type(&file.resource_type) {
                refused.push(Refused {
                    kind,
                    reason: "its type is not a FHIR resource type name".into(),
                    file,
                });
                continue;
            }
            let origin = match url::Url::parse(&file.url) {
                Ok(u) if matches!(u.scheme(), "https" | "http") => u.origin().ascii_serialization(),
                _ => {
                    refused.push(Refused {
                        kind,
                        reason: "the manifest lists a file URL that is not an http(s) URL".into(),
                        file,
                    });
                    continue;
                }
            };
            let trusted = allowed_with_token.contains(&origin);
            if !trusted && !file_origins.contains(&origin) {
                refused.push(Refused {
                    kind,
                    reason: format!(
                        "the file is on another host ({origin}); add it to source.bulk.fileHosts to download it (never with the access token)"
                    ),
                    file,
                });
                continue;
            }
            let token_origins = if m.requires_access_token && trusted {
                allowed_with_token.clone()
            } else {
                Vec::new()
            };
            downloads.push(Download {
                kind,
                file,
                token_origins,
            });
        }
    }
    (downloads, refused)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(requires: bool, urls: &[&str]) -> Manifest {
        Manifest {
            transaction_time: Some("2026-01-01T00:00:00Z".into()),
            request: None,
            requires_access_token: requires,
            output: urls
                .iter()
                .map(|u| FileRef {
                    resource_type: "Patient".into(),
                    url: (*u).into(),
                    count: None,
                })
                .collect(),
            error: vec![],
            deleted: vec![],
        }
    }

    #[test]
    fn token_only_to_trusted_origins() {
        let m = manifest(
            true,
            &[
                "https://fhir.x/f/1",
                "https://store.y/f/2",
                "https://evil.z/f/3",
                "ftp://fhir.x/4",
            ],
        );
        let (ok, refused) = plan_downloads(&m, "https://fhir.x", &[], &["https://store.y".into()]);
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[0].token_origins, vec!["https://fhir.x".to_string()]);
        assert!(
            ok[1].token_origins.is_empty(),
            "allow-listed file host never gets the token"
        );
        assert_eq!(refused.len(), 2);
        assert!(refused[0].reason.contains("fileHosts"));

        let (ok, _) = plan_downloads(
            &manifest(false, &["https://fhir.x/f/1"]),
            "https://fhir.x",
            &[],
            &[],
        );
        assert!(
            ok[0].token_origins.is_empty(),
            "requiresAccessToken false: never send it"
        );

        let (ok, _) = plan_downloads(
            &manifest(true, &["https://files.x/1"]),
            "https://fhir.x",
            &["https://files.x".into()],
            &[],
        );
        assert!(ok[0].token_origins.contains(&"https://files.x".to_string()));
    }
}
