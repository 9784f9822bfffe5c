//! The manifests under `examples/` stay in step with the code: every EpicExport deserializes into the
//! CRD types without losing a field and passes the controller's validation; the operator's and the JWK
//! Set server's Deployments run commands `epic-export` accepts, the operator's RBAC grants what the
//! controller does (Secrets and ConfigMaps by name only) and the JWK Set server's nothing but reading
//! EpicExports; the sandbox
//! kustomization's server arguments parse, its key Secret matches the JWKS the sandbox trusts, and its
//! roster lists exactly the sandbox's patients. (scripts/check-manifests.sh checks the schemas, the CEL
//! rules and the Helm chart.)

use std::collections::BTreeSet;

use clap::Parser;
use epic_export::cli::Cli;
use epic_export::operator::controller::model::{Observed, RefCheck, RefKind, Reference};
use epic_export::operator::controller::validate::validate;
use epic_export::operator::crd::EpicExport;
use serde_json::Value;

fn docs(file: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(format!("{}/examples/{file}", env!("CARGO_MANIFEST_DIR")))
        .unwrap_or_else(|e| panic!("examples/{file}: {e}"));
    serde_saphyr::from_multiple::<Value>(&text).unwrap_or_else(|e| panic!("examples/{file}: {e}"))
}

/// Drops nulls and makes every number a float, so that a round trip compares what was written.
fn strip(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), strip(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip).collect()),
        Value::Number(n) => serde_json::json!(n.as_f64()),
        other => other.clone(),
    }
}

#[test]
fn example_exports_are_complete_and_valid() {
    let mut seen = 0;
    for file in [
        "epicexport-search.yaml",
        "epicexport-bulk.yaml",
        "epicexport-email.yaml",
        "epicexport-s3.yaml",
        "sandbox/export.yaml",
    ] {
        for doc in docs(file).into_iter().filter(|d| d["kind"] == "EpicExport") {
            seen += 1;
            let mut export: EpicExport =
                serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{file}: {e}"));
            let back = serde_json::to_value(&export).unwrap();
            // Every field written in the example is a field of the CRD (none silently dropped).
            let written = strip(&doc["spec"]);
            let kept = strip(&back["spec"]);
            for (k, v) in written.as_object().unwrap() {
                assert_eq!(Some(v), kept.get(k), "{file}: spec.{k} does not round-trip");
            }
            export.metadata.uid = Some("example".into());
            let all_present = Observed {
                references: vec![Reference {
                    field: "spec.auth.keySecretRef",
                    kind: RefKind::Secret,
                    name: "epic-key".into(),
                    key: "private.pem".into(),
                    check: RefCheck::Present,
                }],
                ..Observed::default()
            };
            let images = epic_export::operator::images::ImagePolicy::only("epic-export:0.1.0");
            validate(&export, &all_present, &images).unwrap_or_else(|e| panic!("{file}: {e}"));
        }
    }
    assert_eq!(seen, 5);
}

#[test]
fn the_sandbox_example_is_consistent_with_the_sandbox() {
    use epic_export::auth::{SigningKey, keys};
    use epic_export::cli::Command;
    use epic_export::sandbox::Dataset;

    let all: Vec<Value> = ["sandbox.yaml", "key-secret.yaml", "export.yaml"]
        .iter()
        .flat_map(|f| docs(&format!("sandbox/{f}")))
        .collect();
    let find = |kind: &str, name: &str| {
        all.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("examples/sandbox: no {kind} {name}"))
    };
    let export = find("EpicExport", "sandbox-search");

    // The server's command line.
    let deployment = find("Deployment", "epic-sandbox");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<String> = std::iter::once("epic-export".to_string())
        .chain(
            container["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().to_owned()),
        )
        .collect();
    let cli = Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    let Command::Sandbox(sandbox) = cli.command else {
        panic!("the sandbox Deployment does not run `epic-export sandbox`")
    };
    assert_eq!(sandbox.bind.port(), 8080);
    // It tells clients the Service's name: the origin of the export's baseUrl (else the token
    // endpoint and `next` links would point where the Job cannot, or will not, go).
    let base_url = export["spec"]["fhir"]["baseUrl"].as_str().unwrap();
    let public = sandbox.public_url.clone().expect("--public-url");
    assert_eq!(
        base_url,
        format!("{public}{}", epic_export::sandbox::FHIR_PATH)
    );
    let registrations = sandbox.clients.clone();
    assert_eq!(registrations.len(), 1);
    let (client_id, jwks_path) = registrations[0].split_once('=').unwrap();
    assert_eq!(export["spec"]["auth"]["clientId"], client_id);

    // The JWKS file the sandbox reads is the ConfigMap's key, and the Secret's key is its private half.
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| jwks_path.starts_with(&format!("{}/", m["mountPath"].as_str().unwrap())))
        .expect("the --client JWKS file is on no mounted volume");
    let file = &jwks_path[mount["mountPath"].as_str().unwrap().len() + 1..];
    let volume = deployment["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    let config_map = find("ConfigMap", volume["configMap"]["name"].as_str().unwrap());
    let trusted: Value = serde_json::from_str(config_map["data"][file].as_str().unwrap()).unwrap();
    let key_ref = &export["spec"]["auth"]["keySecretRef"];
    let pem = find("Secret", key_ref["name"].as_str().unwrap())["stringData"]
        [key_ref["key"].as_str().unwrap()]
    .as_str()
    .unwrap();
    let key = SigningKey::from_pem(
        pem.as_bytes(),
        std::path::Path::new("key-secret.yaml"),
        None,
        None,
    )
    .unwrap();
    assert_eq!(
        keys::jwks(&[key]),
        trusted,
        "the Secret's key is not the one the sandbox trusts"
    );

    // The roster is every sandbox patient.
    let roster_ref = &export["spec"]["source"]["search"]["rosterRef"];
    let roster = find("ConfigMap", roster_ref["configMapName"].as_str().unwrap())["data"]
        [roster_ref["key"].as_str().unwrap()]
    .as_str()
    .unwrap();
    let listed: Vec<&str> = roster.lines().skip(1).filter(|l| !l.is_empty()).collect();
    assert_eq!(
        listed,
        Dataset::generate(sandbox.patients, sandbox.seed).patient_ids()
    );
}

#[test]
fn the_operator_deployment_runs_a_real_command_with_enough_rbac() {
    let docs = docs("operator.yaml");
    let deployment = docs
        .iter()
        .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "epic-export-operator")
        .unwrap();
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = std::iter::once("epic-export")
        .chain(
            container["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap()),
        )
        .chain(["--image", "x"])
        .collect();
    Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    let env: BTreeSet<&str> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(env.contains("EPIC_EXPORT_IMAGE") && env.contains("POD_NAME"));

    // The roles bound to the operator's ServiceAccount.
    let operator_roles: Vec<&str> = docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRoleBinding" || d["kind"] == "RoleBinding")
        .filter(|b| b["subjects"][0]["name"] == "epic-export-operator")
        .map(|b| b["roleRef"]["name"].as_str().unwrap())
        .collect();
    let rules = rule_triples(
        docs.iter()
            .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
            .filter(|d| operator_roles.contains(&d["metadata"]["name"].as_str().unwrap()))
            .flat_map(|d| d["rules"].as_array().unwrap().clone()),
    );
    // What the controller does (see tests/operator_controller.rs for the requests themselves).
    for (group, resource, verb) in [
        ("fhirexport.dev", "epicexports", "list"),
        ("fhirexport.dev", "epicexports", "watch"),
        ("fhirexport.dev", "epicexports/status", "patch"),
        ("batch", "jobs", "create"),
        ("batch", "jobs", "delete"),
        ("batch", "jobs", "watch"),
        ("", "pods", "list"),
        ("", "secrets", "get"),
        ("", "configmaps", "get"),
        ("events.k8s.io", "events", "create"),
        ("events.k8s.io", "events", "patch"),
        ("coordination.k8s.io", "leases", "update"),
        ("coordination.k8s.io", "leases", "create"),
    ] {
        assert!(
            rules.contains(&(group.into(), resource.into(), verb.into())),
            "RBAC lacks {verb} {group}/{resource}"
        );
    }

    // Secrets and ConfigMaps are read by name: never listed or watched (that would read them all).
    for resource in ["secrets", "configmaps"] {
        for verb in ["list", "watch"] {
            assert!(
                !rules.contains(&("".into(), resource.into(), verb.into())),
                "the operator may {verb} {resource}"
            );
        }
    }

    // The JWK Set server: `epic-export jwks-server`, under a ServiceAccount of its own that may only
    // read EpicExports.
    let jwks = docs
        .iter()
        .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "epic-export-operator-jwks")
        .expect("a JWK Set server Deployment");
    let pod = &jwks["spec"]["template"]["spec"];
    let args: Vec<&str> = std::iter::once("epic-export")
        .chain(
            pod["containers"][0]["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap()),
        )
        .collect();
    let cli = Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(matches!(
        cli.command,
        epic_export::cli::Command::JwksServer(_)
    ));
    assert_eq!(pod["serviceAccountName"], "epic-export-operator-jwks");
    let jwks_roles: Vec<&str> = docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRoleBinding" || d["kind"] == "RoleBinding")
        .filter(|b| b["subjects"][0]["name"] == "epic-export-operator-jwks")
        .map(|b| b["roleRef"]["name"].as_str().unwrap())
        .collect();
    let jwks_rules = rule_triples(
        docs.iter()
            .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
            .filter(|d| jwks_roles.contains(&d["metadata"]["name"].as_str().unwrap()))
            .flat_map(|d| d["rules"].as_array().unwrap().clone()),
    );
    let read_exports: Vec<(String, String, String)> = ["get", "list", "watch"]
        .iter()
        .map(|v| ("fhirexport.dev".into(), "epicexports".into(), v.to_string()))
        .collect();
    assert_eq!(jwks_rules, read_exports);

    // What it does only for key rotation (the chart's keyRotation.enabled, off by default): not
    // granted by examples/operator.yaml, which keeps the chart's default RBAC (scripts/check-manifests.sh
    // compares them and checks the chart's rotation rule), but offered there as a commented-out rule.
    let text = std::fs::read_to_string(format!(
        "{}/examples/operator.yaml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let mut commented = Vec::new();
    let mut inside = false;
    for line in text.lines().map(str::trim_start) {
        if line.starts_with("# - apiGroups:") {
            inside = true;
        } else if !(inside && line.starts_with("#   ")) {
            inside = false;
        }
        if inside {
            commented.push(&line[2..]);
        }
    }
    let commented: Vec<Value> = serde_saphyr::from_str(&commented.join("\n"))
        .unwrap_or_else(|e| panic!("examples/operator.yaml: the commented rules: {e}"));
    let commented = rule_triples(commented);
    // Key rotation rewrites the key Secret (`controller::apply::change_key`).
    let (group, resource, verb) = ("", "secrets", "update");
    assert!(
        commented.contains(&(group.into(), resource.into(), verb.into())),
        "examples/operator.yaml: no commented-out rule for {verb} {group}/{resource} (key rotation)"
    );
}

/// Every (apiGroup, resource, verb) that RBAC rules grant.
fn rule_triples(rules: impl IntoIterator<Item = Value>) -> Vec<(String, String, String)> {
    rules
        .into_iter()
        .flat_map(|r| {
            let groups: Vec<String> = r["apiGroups"]
                .as_array()
                .unwrap()
                .iter()
                .map(|g| g.as_str().unwrap().to_owned())
                .collect();
            let resources: Vec<String> = r["resources"]
                .as_array()
                .unwrap()
                .iter()
                .map(|g| g.as_str().unwrap().to_owned())
                .collect();
            let verbs: Vec<String> = r["verbs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|g| g.as_str().unwrap().to_owned())
                .collect();
            let mut out = Vec::new();
            for g in &groups {
                for res in &resources {
                    for v in &verbs {
                        out.push((g.clone(), res.clone(), v.clone()));
                    }
                }
            }
            out
        })
        .collect()
}
