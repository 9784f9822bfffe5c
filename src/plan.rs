//! `ExportPlan`: the one validated description of a run. Every front end (YAML config, later the INI files
//! and the Kubernetes resource) converts into it; nothing downstream knows where it came from.

use std::path::PathBuf;
use std::time::Duration;

use crate::auth::Algorithm;
use crate::fhir::Limits;

#[derive(Clone, Debug)]
pub struct ExportPlan {
    pub name: String,
    /// FHIR base URL without a trailing slash.
    pub fhir_base: String,
    /// Token URL; discovered from the base when `None`.
    pub token_url: Option<String>,
    pub client_id: String,
    pub private_key_file: PathBuf,
    pub algorithm: Option<Algorithm>,
    pub key_id: Option<String>,
    pub jwks_url: Option<String>,
    pub scope: String,
    pub patients: Vec<String>,
    pub searches: Vec<Search>,
    pub output_dir: PathBuf,
    pub keep_runs: usize,
    pub limits: Limits,
    pub request_timeout: Duration,
}

/// One configured search: a resource type and its extra parameters (the patient is added per patient).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Search {
    pub resource_type: String,
    pub params: Vec<(String, String)>,
}

impl Search {
    /// Validates a resource type and its parameters.
    pub fn new(resource_type: String, params: Vec<(String, String)>) -> Result<Search, String> {
        let t = resource_type.trim().to_owned();
        if t.is_empty()
            || !t.starts_with(|c: char| c.is_ascii_uppercase())
            || !t.chars().all(|c| c.is_ascii_alphanumeric())
        {
            return Err(format!(
                "{t:?} is not a FHIR resource type (e.g. Observation, Condition)"
            ));
        }
        for (k, _) in &params {
            if k.is_empty() {
                return Err(format!("{t}: a search parameter has an empty name"));
            }
            if matches!(k.as_str(), "patient" | "subject" | "_id") {
                return Err(format!(
                    "{t}: do not set `{k}`; the patient comes from the roster"
                ));
            }
        }
        if t == "Patient" && !params.is_empty() {
            return Err(
                "Patient is read by id (Patient/{id}) and takes no search parameters".into(),
            );
        }
        if t == "Observation" && !params.iter().any(|(k, _)| k == "category" || k == "code") {
            return Err("Observation needs a category or code parameter (Epic rejects Observation searches without one), e.g. category=laboratory".into());
        }
        Ok(Search {
            resource_type: t,
            params,
        })
    }

    /// A short label for logs and the summary, e.g. `Observation?category=laboratory`. Contains no PHI.
    pub fn label(&self) -> String {
        if self.params.is_empty() {
            return self.resource_type.clone();
        }
        let q: Vec<String> = self
            .params
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!("{}?{}", self.resource_type, q.join("&"))
    }
}
