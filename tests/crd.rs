//! The EpicExport CRD: the committed `crds/epicexport.yaml` is exactly what `epic-export crd` prints, and
//! the schema carries the descriptions, printer columns and validation rules users rely on.

use epic_export::operator::crd::{EpicExport, crd_yaml};
use kube::CustomResourceExt;

#[test]
fn committed_crd_matches_the_code() {
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/epicexport.yaml"))
            .unwrap();
    assert!(
        committed == crd_yaml().unwrap(),
        "crds/epicexport.yaml is stale: run `cargo run -- crd > crds/epicexport.yaml` and commit it"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_epic-export"))
        .arg("crd")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), committed);
}

#[test]
fn the_schema_explains_and_validates() {
    let crd = serde_json::to_value(EpicExport::crd()).unwrap();
    assert_eq!(crd["spec"]["group"], "fhirexport.dev");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(crd["spec"]["names"]["shortNames"][0], "epx");
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert!(
        version["subresources"]["status"].is_object(),
        "status subresource"
    );
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        columns,
        ["Schedule", "Suspended", "Last Run", "Result", "Age"]
    );

    let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
    for field in [
        "fhir",
        "auth",
        "source",
        "output",
        "schedule",
        "timeZone",
        "suspend",
        "concurrencyPolicy",
        "startingDeadlineSeconds",
        "job",
    ] {
        let description = spec["properties"][field]["description"]
            .as_str()
            .unwrap_or_default();
        assert!(
            !description.is_empty(),
            "spec.{field} has a description for kubectl explain"
        );
    }
    assert_eq!(
        spec["properties"]["concurrencyPolicy"]["default"], "Forbid",
        "CronJob fields with their defaults"
    );
    assert_eq!(
        spec["properties"]["successfulRunsHistoryLimit"]["default"],
        3
    );
    assert_eq!(spec["properties"]["failedRunsHistoryLimit"]["default"], 1);
    let text = serde_json::to_string(&crd).unwrap();
    for rule in [
        "has(self.search) != has(self.bulk)",
        "has(self.group) != has(self.level)",
        "self.metadata.name.size() <= 52",
        "!self.contains('TZ=')",
        "has(self.volumeClaimName) != has(self.url)",
        "has(self.volumeClaimName) || !has(self.subPath)",
    ] {
        assert!(text.contains(rule), "CEL rule {rule:?} missing");
    }
}
