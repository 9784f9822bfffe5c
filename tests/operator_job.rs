//! Export Jobs built from an EpicExport (pure), and `epic-export job`, the pod's entry point, run against
//! the sandbox with its report in the termination message.

mod support;

use epic_export::operator::crd::EpicExport;
use epic_export::operator::job::{
    JOB_CONFIG_ENV, RunInputs, RunReportMessage, TERMINATION_MESSAGE_MAX, build_job, run_config,
};
use epic_export::sandbox::SandboxOptions;
use support::*;

fn export(yaml_spec: &str) -> EpicExport {
    let doc = format!(
        "apiVersion: fhirexport.dev/v1alpha1\nkind: EpicExport\nmetadata:\n  name: nightly\n  namespace: phi\n  uid: 1234-abcd\nspec:\n{yaml_spec}"
    );
    serde_saphyr::from_str(&doc).unwrap()
}

const SEARCH_SPEC: &str = "  schedule: \"0 2 * * *\"
  fhir:
    baseUrl: https://fhir.example.org/api/FHIR/R4
  auth:
    clientId: abc
    keySecretRef: {name: epic-key, key: private.pem}
  source:
    search:
      rosterRef: {configMapName: roster, key: roster.csv}
      resourcesRef: {configMapName: roster, key: resources.csv}
  output:
    volumeClaimName: exports
    subPath: nightly
  job:
    activeDeadlineSeconds: 7200
";

fn inputs() -> RunInputs {
    RunInputs {
        job_name: "nightly-29400000".into(),
        scheduled_at: "2026-11-28T02:00:00-06:00".into(),
        since: None,
    }
}

#[test]
fn the_job_is_locked_down_and_mounts_what_the_run_needs() {
    let e = export(SEARCH_SPEC);
    let job = build_job(&e, &inputs(), "registry.example.org/epic-export:0.1.0").unwrap();
    let v = serde_json::to_value(&job).unwrap();
    assert_eq!(v["metadata"]["name"], "nightly-29400000");
    assert_eq!(v["metadata"]["namespace"], "phi");
    assert_eq!(v["metadata"]["labels"]["fhirexport.dev/export"], "nightly");
    assert_eq!(v["metadata"]["ownerReferences"][0]["uid"], "1234-abcd");
    assert_eq!(v["metadata"]["ownerReferences"][0]["controller"], true);
    assert_eq!(v["spec"]["backoffLimit"], 0);
    assert_eq!(v["spec"]["activeDeadlineSeconds"], 7200);
    let pod = &v["spec"]["template"]["spec"];
    assert_eq!(pod["restartPolicy"], "Never");
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let c = &pod["containers"][0];
    assert_eq!(c["image"], "registry.example.org/epic-export:0.1.0");
    assert_eq!(c["args"][0], "job");
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");

    let volumes = pod["volumes"].as_array().unwrap();
    let key = volumes.iter().find(|v| v["name"] == "key").unwrap();
    assert_eq!(key["secret"]["secretName"], "epic-key");
    assert_eq!(key["secret"]["items"][0]["mode"], 0o400);
    assert_eq!(
        volumes
            .iter()
            .filter(|v| v["configMap"]["name"] == "roster")
            .count(),
        1,
        "one volume per ConfigMap"
    );
    assert!(
        volumes
            .iter()
            .any(|v| v["persistentVolumeClaim"]["claimName"] == "exports")
    );
    let mounts = c["volumeMounts"].as_array().unwrap();
    assert!(
        mounts
            .iter()
            .filter(|m| m["name"] != "data" && m["name"] != "tmp")
            .all(|m| m["readOnly"] == true)
    );
    assert_eq!(
        mounts.iter().find(|m| m["name"] == "data").unwrap()["subPath"],
        "nightly"
    );

    // The config travels in the environment (shown by kubectl describe) and holds no secret.
    let env = &c["env"][0];
    assert_eq!(env["name"], JOB_CONFIG_ENV);
    let config: serde_json::Value = serde_json::from_str(env["value"].as_str().unwrap()).unwrap();
    assert_eq!(
        config["auth"]["privateKeyFile"],
        "/var/run/secrets/epic-export/key/private.pem"
    );
    assert_eq!(
        config["source"]["search"]["rosterFile"],
        "/etc/epic-export/roster/roster.csv"
    );
    assert!(!env["value"].as_str().unwrap().contains("PRIVATE KEY"));

    let mut other = e.clone();
    other.spec.job.as_mut().unwrap().image = Some("mirror.local/epic-export:pinned".into());
    let job = build_job(&other, &inputs(), "default-image").unwrap();
    assert_eq!(
        job.spec.unwrap().template.spec.unwrap().containers[0]
            .image
            .as_deref(),
        Some("mirror.local/epic-export:pinned")
    );

    let mut no_uid = e;
    no_uid.metadata.uid = None;
    assert!(build_job(&no_uid, &inputs(), "img").is_err());
}

#[test]
fn a_bulk_export_becomes_a_bulk_config() {
    let spec = SEARCH_SPEC.replace(
        "    search:\n      rosterRef: {configMapName: roster, key: roster.csv}\n      resourcesRef: {configMapName: roster, key: resources.csv}\n",
        "    bulk:\n      group: e3iab\n      since: auto\n",
    );
    let config = run_config(&export(&spec)).unwrap();
    assert_eq!(config["source"]["bulk"]["group"], "e3iab");
    assert_eq!(config["source"]["bulk"]["since"], "auto");
    // The pod's config is a valid standalone config (only the key file is missing here).
    let plan = epic_export::config::plan_from_text(
        &config.to_string(),
        std::path::Path::new("env"),
        std::path::Path::new("/"),
    );
    assert!(plan.is_ok(), "{:?}", plan.err());
}

#[test]
fn attachments_and_hydrate_reach_the_pods_config() {
    // A bulk source: the pod's config then needs no mounted files to become a plan here.
    let bulk = SEARCH_SPEC.replace(
        "    search:\n      rosterRef: {configMapName: roster, key: roster.csv}\n      resourcesRef: {configMapName: roster, key: resources.csv}\n",
        "    bulk:\n      group: e3iab\n",
    );
    let spec = format!(
        "{bulk}  attachments:\n    enabled: true\n    contentTypes: [text/html, application/pdf]\n    maxBytes: 5000000\n  hydrate: [Medication, Location]\n"
    );
    let config = run_config(&export(&spec)).unwrap();
    assert_eq!(config["attachments"]["enabled"], true);
    assert_eq!(config["attachments"]["maxBytes"], 5_000_000);
    assert_eq!(
        config["hydrate"],
        serde_json::json!(["Medication", "Location"])
    );
    let plan = epic_export::config::plan_from_text(
        &config.to_string(),
        std::path::Path::new("env"),
        std::path::Path::new("/"),
    )
    .unwrap();
    let a = plan.attachments.as_ref().unwrap();
    assert_eq!(a.content_types, ["text/html", "application/pdf"]);
    assert_eq!(plan.hydrate, ["Medication", "Location"]);
    // A bulk export of every type asks for system/*.read, which covers Binary and the hydrated types.
    assert_eq!(plan.scope, "system/*.read");
    // A mistake in the resource names the field the pod's config reports.
    let bad = spec.replace("application/pdf", "pdf");
    let err = epic_export::config::plan_from_text(
        &run_config(&export(&bad)).unwrap().to_string(),
        std::path::Path::new("env"),
        std::path::Path::new("/"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("attachments.contentTypes[1]"), "{err}");
}

#[test]
fn the_termination_message_fits_in_4_kib() {
    let report = RunReportMessage {
        outcome: "partial".into(),
        errors: (0..200)
            .map(|i| format!("search {i} failed: {}", "x".repeat(500)))
            .collect(),
        ..RunReportMessage::default()
    };
    let text = report.to_message().unwrap();
    assert!(text.len() <= TERMINATION_MESSAGE_MAX, "{}", text.len());
    let back: RunReportMessage = serde_json::from_str(&text).unwrap();
    assert!(back.errors_omitted > 0 && !back.errors.is_empty());
    assert_eq!(back.outcome, "partial");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_command_runs_the_export_and_reports_in_the_termination_message() {
    let env = env(SandboxOptions {
        patients: 3,
        ..SandboxOptions::default()
    })
    .await;
    let patients = env.sandbox.dataset().patient_ids();
    let config_path = env.write_config(&patients, ALL_SEARCHES, FAST_LIMITS);
    let plan_text = std::fs::read_to_string(&config_path).unwrap();
    // The pod gets absolute paths; make this config's relative ones absolute the same way.
    let dir = env.path().display().to_string();
    let plan_text = plan_text
        .replace("keys/private.pem", &format!("{dir}/keys/private.pem"))
        .replace(
            "rosterFile: roster.csv",
            &format!("rosterFile: {dir}/roster.csv"),
        )
        .replace(
            "resourcesFile: resources.csv",
            &format!("resourcesFile: {dir}/resources.csv"),
        )
        .replace("directory: out", &format!("directory: {dir}/out"));
    let log = env.path().join("termination-log");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_epic-export"))
        .args(["job", "--termination-log"])
        .arg(&log)
        .env(JOB_CONFIG_ENV, &plan_text)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: RunReportMessage = serde_json::from_slice(&std::fs::read(&log).unwrap()).unwrap();
    assert_eq!(report.outcome, "success");
    assert_eq!(report.records_by_type["Patient"], 3);
    assert!(report.records > 3 && report.output_dir.contains("test-export"));

    // Without its config the pod fails with a message naming the variable, also in the report.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_epic-export"))
        .args(["job", "--termination-log"])
        .arg(&log)
        .env_remove(JOB_CONFIG_ENV)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let report: RunReportMessage = serde_json::from_slice(&std::fs::read(&log).unwrap()).unwrap();
    assert_eq!(report.outcome, "failed");
    assert!(report.errors[0].contains(JOB_CONFIG_ENV));
}

/// `SEARCH_SPEC` with a bulk source (no mounted files: the pod's config becomes a plan here) and
/// `output` replaced by `output_lines`.
fn bulk_spec_with_output(output_lines: &str) -> String {
    SEARCH_SPEC
        .replace(
            "    search:\n      rosterRef: {configMapName: roster, key: roster.csv}\n      resourcesRef: {configMapName: roster, key: resources.csv}\n",
            "    bulk:\n      group: e3iab\n",
        )
        .replace(
            "  output:\n    volumeClaimName: exports\n    subPath: nightly\n",
            output_lines,
        )
}

fn pod_of(job: &k8s_openapi::api::batch::v1::Job) -> serde_json::Value {
    serde_json::to_value(job).unwrap()["spec"]["template"]["spec"].clone()
}

/// The pod's `data` volume (the output claim, or the scratch emptyDir).
fn data_volume(pod: &serde_json::Value) -> serde_json::Value {
    let volumes = pod["volumes"].as_array().unwrap();
    volumes
        .iter()
        .find(|v| v["name"] == "data")
        .unwrap()
        .clone()
}

fn config_of(pod: &serde_json::Value) -> serde_json::Value {
    let env = pod["containers"][0]["env"].as_array().unwrap();
    let config = env.iter().find(|e| e["name"] == JOB_CONFIG_ENV).unwrap();
    serde_json::from_str(config["value"].as_str().unwrap()).unwrap()
}

#[test]
fn an_object_store_output_gets_a_scratch_volume_its_credentials_and_the_url_in_the_config() {
    let spec = bulk_spec_with_output(
        "  output:
    url: s3://phi-exports/epic
    endpoint: https://minio.example.org
    region: us-east-1
    compression: gzip
    partSize: 16777216
    uploadConcurrency: 8
    keepRuns: 10
    credentialsSecretRef: {name: s3-credentials}
",
    )
    .replace(
        "  job:\n    activeDeadlineSeconds: 7200\n",
        "  job:\n    serviceAccountName: epic-export-s3\n    podLabels: {azure.workload.identity/use: \"true\"}\n",
    );
    let e = export(&spec);
    let job = build_job(&e, &inputs(), "img").unwrap();
    let pod = pod_of(&job);

    // No volume claim: an emptyDir with a size limit where the volume would be.
    let volumes = pod["volumes"].as_array().unwrap();
    assert!(
        volumes.iter().all(|v| v["persistentVolumeClaim"].is_null()),
        "{volumes:?}"
    );
    let data = volumes.iter().find(|v| v["name"] == "data").unwrap();
    assert_eq!(data["emptyDir"]["sizeLimit"], "2Gi");
    let c = &pod["containers"][0];
    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "data")
        .unwrap();
    assert_eq!(mount["mountPath"], "/data");
    assert!(mount["subPath"].is_null());

    // The credentials: the Secret's keys as environment variables; the run's config stays the one
    // variable set directly (which envFrom cannot override).
    assert_eq!(
        c["envFrom"],
        serde_json::json!([{"secretRef": {"name": "s3-credentials", "optional": false}}])
    );
    assert_eq!(c["env"].as_array().unwrap().len(), 1);
    // The pods' identity, still without a Kubernetes API token.
    assert_eq!(pod["serviceAccountName"], "epic-export-s3");
    assert_eq!(pod["automountServiceAccountToken"], false);
    // The extra label on the pods (not on the Job), beside the operator's own.
    let job_value = serde_json::to_value(&job).unwrap();
    let pod_labels = &job_value["spec"]["template"]["metadata"]["labels"];
    assert_eq!(pod_labels["azure.workload.identity/use"], "true");
    assert_eq!(pod_labels["fhirexport.dev/export"], "nightly");
    assert!(job_value["metadata"]["labels"]["azure.workload.identity/use"].is_null());

    // The pod's config: the working folder on the emptyDir, the URL and its options.
    let config = config_of(&pod);
    assert_eq!(
        config["output"],
        serde_json::json!({
            "directory": "/data",
            "url": "s3://phi-exports/epic",
            "endpoint": "https://minio.example.org",
            "region": "us-east-1",
            "compression": "gzip",
            "partSize": 16777216,
            "uploadConcurrency": 8,
            "keepRuns": 10,
        })
    );
    assert_eq!(config, run_config(&e).unwrap());
    // ... which the pod's standalone config validation turns into an object store plan.
    let plan = epic_export::config::plan_from_text(
        &config.to_string(),
        std::path::Path::new("env"),
        std::path::Path::new("/"),
    )
    .unwrap();
    assert_eq!(plan.output_dir, std::path::Path::new("/data"));
    assert_eq!(plan.compression, epic_export::plan::Compression::Gzip);
    let object = plan.object_output.expect("an object store plan");
    assert_eq!(object.location.bucket, "phi-exports");
    assert_eq!(object.location.prefix.as_ref(), "epic");
    assert_eq!(
        object.location.endpoint.as_deref(),
        Some("https://minio.example.org")
    );
    assert_eq!(object.location.region.as_deref(), Some("us-east-1"));
    assert_eq!((object.part_size, object.upload_concurrency), (16777216, 8));

    // Without credentialsSecretRef the pod gets no envFrom (its identity is used); the scratch
    // volume's limit can be raised.
    let mut own_identity = e.clone();
    own_identity.spec.output.credentials_secret_ref = None;
    own_identity.spec.output.scratch_size_limit = Some("10Gi".into());
    let pod = pod_of(&build_job(&own_identity, &inputs(), "img").unwrap());
    assert!(pod["containers"][0]["envFrom"].is_null());
    let data = data_volume(&pod);
    assert_eq!(data["emptyDir"]["sizeLimit"], "10Gi");
}

#[test]
fn a_volume_output_keeps_its_claim_and_takes_compression_only() {
    let e = export(&bulk_spec_with_output(
        "  output:\n    volumeClaimName: exports\n    subPath: nightly\n    compression: gzip\n",
    ));
    let pod = pod_of(&build_job(&e, &inputs(), "img").unwrap());
    let data = data_volume(&pod);
    assert_eq!(data["persistentVolumeClaim"]["claimName"], "exports");
    assert!(data["emptyDir"].is_null());
    assert!(pod["containers"][0]["envFrom"].is_null());
    assert_eq!(
        config_of(&pod)["output"],
        serde_json::json!({"directory": "/data", "compression": "gzip"})
    );
}

#[test]
fn a_job_is_not_built_for_an_output_that_is_both_or_neither() {
    let both = export(&bulk_spec_with_output(
        "  output:\n    volumeClaimName: exports\n    url: s3://phi-exports/epic\n",
    ));
    let neither = export(&bulk_spec_with_output("  output:\n    keepRuns: 3\n"));
    for (e, what) in [(both, "not both"), (neither, "set volumeClaimName")] {
        let err = build_job(&e, &inputs(), "img").unwrap_err();
        match &err {
            epic_export::operator::job::BuildError::Invalid { field, message, .. } => {
                assert_eq!(*field, "spec.output");
                assert!(message.contains(what), "{err}");
            }
            other => panic!("{other}"),
        }
    }
}

#[test]
fn a_run_url_survives_the_termination_message_limit() {
    // The exporter reports an object run's URL as its output folder; a long prefix and an error
    // list far over 4 KiB must not cost the URL.
    let url = format!(
        "s3://phi-exports/{}/nightly/20261128T020000Z/",
        "department/of/research/".repeat(8)
    );
    let report = RunReportMessage {
        outcome: "partial".into(),
        run_id: "20261128T020000Z".into(),
        output_dir: url.clone(),
        errors: (0..200)
            .map(|i| format!("search {i} failed: {}", "x".repeat(500)))
            .collect(),
        ..RunReportMessage::default()
    };
    let text = report.to_message().unwrap();
    assert!(text.len() <= TERMINATION_MESSAGE_MAX, "{}", text.len());
    let back: RunReportMessage = serde_json::from_str(&text).unwrap();
    assert_eq!(back.output_dir, url);
}
