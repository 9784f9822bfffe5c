//! `epic-export demo`: the whole flow offline. Starts the built-in sandbox on an ephemeral loopback port,
//! makes a throwaway key, registers it, writes a config with a roster and resource list (the same files a
//! user writes), runs the export from that config and prints the summary. The export downloads the
//! notes' documents and hydrates the references, so the summary shows attachments and hydrated types.
//! `--bulk` runs a Bulk Data Group export of the sandbox's patients instead of per-patient searches.

use std::path::{Path, PathBuf};

use crate::auth::{Algorithm, KeyError, SigningKey, keys};
use crate::config::ConfigError;
use crate::export::{RunOptions, RunReport};
use crate::run::{RunError, RunOutcome};
use crate::sandbox::{
    ClientKeys, ClientRegistration, SANDBOX_GROUP_ID, Sandbox, SandboxError, SandboxOptions,
};

/// Why the demo stopped.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{what}: {source}")]
    Write {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error("building the demo JWKS: {0}")]
    Jwks(serde_json::Error),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("the demo's export did not finish: {0}")]
    Unfinished(String),
}

fn write_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DemoError {
    let what = what.into();
    move |source| DemoError::Write { what, source }
}

/// The resource list the demo exports (the original tool's CSV format).
pub const DEMO_RESOURCES_CSV: &str = "resource_type,search_params
Patient,
Condition,
Observation,category=laboratory
Observation,category=vital-signs
Observation,category=social-history
MedicationRequest,
AllergyIntolerance,
Immunization,
Procedure,
Encounter,
DiagnosticReport,
DocumentReference,
";

pub const DEMO_CLIENT_ID: &str = "epic-export-demo";

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub out: PathBuf,
    pub patients: usize,
    /// A Bulk Data Group export instead of per-patient searches.
    pub bulk: bool,
    pub interactive: bool,
}

/// Writes the demo's key, roster, resource list and config into `dir`; returns the config path.
pub fn write_demo_files(
    dir: &Path,
    key: &SigningKey,
    sandbox: &Sandbox,
    patient_ids: &[String],
    bulk: bool,
) -> Result<PathBuf, DemoError> {
    let keys_dir = dir.join("keys");
    if keys_dir.join("private.pem").exists() {
        std::fs::remove_file(keys_dir.join("private.pem"))
            .map_err(write_error("removing the previous demo key"))?;
    }
    keys::write_key_pair(key, &keys_dir)?;
    let mut roster = String::from("patient_id\n");
    for id in patient_ids {
        roster.push_str(id);
        roster.push('\n');
    }
    std::fs::write(dir.join("roster.csv"), roster).map_err(write_error("writing roster.csv"))?;
    std::fs::write(dir.join("resources.csv"), DEMO_RESOURCES_CSV)
        .map_err(write_error("writing resources.csv"))?;
    let config = format!(
        "# Written by `epic-export demo` for its throwaway sandbox (gone when the demo ends).\n\
         name: demo\n\
         fhir:\n  baseUrl: {base}\n\
         auth:\n  clientId: {DEMO_CLIENT_ID}\n  privateKeyFile: keys/private.pem\n  algorithm: {alg}\n\
         source:\n{source}\
         output:\n  directory: output\n  keepRuns: 5\n\
         limits:\n  concurrency: 8\n  requestsPerSecond: 0\n\
         # Clinical notes (HTML, RTF, PDF) into output/demo/<run>/attachments/, and the resources\n\
         # the export references (the drug of each MedicationRequest, the clinicians...) fetched once each.\n\
         attachments:\n  enabled: true\n\
         hydrate: [Medication, Practitioner, PractitionerRole, Organization, Location]\n",
        base = sandbox.base_url(),
        alg = key.algorithm(),
        source = if bulk {
            format!("  bulk:\n    group: {SANDBOX_GROUP_ID}\n")
        } else {
            "  search:\n    rosterFile: roster.csv\n    resourcesFile: resources.csv\n".to_string()
        },
    );
    let path = dir.join("epic-export.yaml");
    std::fs::write(&path, config).map_err(write_error("writing epic-export.yaml"))?;
    Ok(path)
}

/// Runs the demo and returns the run's report.
pub async fn run(opts: &DemoOptions) -> Result<RunReport, DemoError> {
    crate::output::create_private_dir(&opts.out)
        .map_err(write_error(format!("creating {}", opts.out.display())))?;
    let sandbox = Sandbox::start(SandboxOptions {
        patients: opts.patients,
        ..SandboxOptions::default()
    })
    .await?;
    println!("sandbox listening: {}", sandbox.base_url());
    let key = SigningKey::generate(Algorithm::ES384)?;
    let jwks =
        serde_json::from_value(keys::jwks(std::slice::from_ref(&key))).map_err(DemoError::Jwks)?;
    sandbox.register_client(ClientRegistration {
        client_id: DEMO_CLIENT_ID.into(),
        keys: ClientKeys::Jwks(jwks),
    });
    let ids = sandbox.dataset().patient_ids();
    let config = write_demo_files(&opts.out, &key, &sandbox, &ids, opts.bulk)?;
    println!(
        "config, key, roster and resource list: {}",
        opts.out.display()
    );
    let plan = crate::config::load_plan(&config)?;
    let outcome = crate::run::run_once(
        &plan,
        &RunOptions {
            interactive: opts.interactive,
        },
    )
    .await;
    sandbox.shutdown().await;
    match outcome? {
        RunOutcome::Finished(report) => Ok(*report),
        RunOutcome::Unfinished(why) => Err(DemoError::Unfinished(why)),
    }
}
