//! Bad config, roster and resource files: each gets a message naming the file, field or line and the fix.

use std::path::{Path, PathBuf};

use epic_export::config::load_plan;

struct Files {
    dir: tempfile::TempDir,
}

const GOOD: &str = "name: nightly
fhir:
  baseUrl: https://fhir.example.org/api/FHIR/R4
auth:
  clientId: abc
  privateKeyFile: key.pem
source:
  search:
    rosterFile: roster.csv
    resourcesFile: resources.csv
";

impl Files {
    fn new() -> Files {
        let f = Files {
            dir: tempfile::tempdir().unwrap(),
        };
        f.write(
            "roster.csv",
            "patient_id,name\nerXuFYUfucBZaryVksYEcMg3,Camila\neq081-VQEgP8drUUqCWzHfw3,Derrick\n",
        );
        f.write("resources.csv", "resource_type,search_params\nPatient,\nObservation,category=laboratory\nObservation,category=vital-signs\n");
        f
    }
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn err(&self, yaml: &str) -> String {
        let p = self.write("config.yaml", yaml);
        load_plan(&p).expect_err("should be rejected").to_string()
    }
}

#[test]
fn a_good_config_becomes_a_plan() {
    let f = Files::new();
    let plan = load_plan(&f.write("config.yaml", GOOD)).unwrap();
    assert_eq!(
        plan.search().unwrap().patients,
        vec!["erXuFYUfucBZaryVksYEcMg3", "eq081-VQEgP8drUUqCWzHfw3"]
    );
    assert_eq!(plan.search().unwrap().searches.len(), 3);
    assert_eq!(
        plan.search().unwrap().searches[1].label(),
        "Observation?category=laboratory"
    );
    assert_eq!(
        plan.private_key_file,
        f.path().join("key.pem"),
        "relative to the config file"
    );
    assert_eq!(plan.output_dir, f.path().join("epic_data_export"));
    assert_eq!(plan.scope, "system/Observation.read system/Patient.read");
    assert_eq!(plan.limits.concurrency, 8);
    assert_eq!(plan.limits.requests_per_second, Some(10.0));
    assert!(plan.token_url.is_none());
}

#[test]
fn output_url_becomes_the_destination() {
    let f = Files::new();
    let plan = load_plan(&f.write(
        "config.yaml",
        &format!(
            "{GOOD}output:\n  directory: work\n  url: s3://phi-exports/epic/prod\n  region: eu-west-1\n  compression: gzip\n  partSize: 16777216\n  uploadConcurrency: 8\n"
        ),
    ))
    .unwrap();
    let o = plan.object_output.expect("an object store");
    assert_eq!(o.location.url(), "s3://phi-exports/epic/prod");
    assert_eq!(o.location.region.as_deref(), Some("eu-west-1"));
    assert_eq!((o.part_size, o.upload_concurrency), (16 << 20, 8));
    assert_eq!(plan.output_dir, f.path().join("work"), "the working folder");
    assert_eq!(plan.compression, epic_export::plan::Compression::Gzip);

    // A file: URL is a local folder.
    let plan = load_plan(&f.write(
        "config.yaml",
        &format!("{GOOD}output:\n  url: file:///srv/exports\n"),
    ))
    .unwrap();
    assert!(plan.object_output.is_none());
    assert_eq!(plan.output_dir, Path::new("/srv/exports"));
}

#[test]
fn attachments_and_hydrate_become_the_plan_and_the_scope() {
    let f = Files::new();
    let yaml = format!(
        "{GOOD}attachments:\n  enabled: true\n  contentTypes: [TEXT/HTML, application/pdf]\n  inlineSmallerThan: 1024\n  fileHosts: [https://files.example.org/]\nhydrate: [Medication, Practitioner, Medication]\n"
    );
    let plan = load_plan(&f.write("config.yaml", &yaml)).unwrap();
    let a = plan.attachments.as_ref().unwrap();
    assert_eq!(a.resources, ["DocumentReference", "DiagnosticReport"]);
    assert_eq!(a.content_types, ["text/html", "application/pdf"]);
    assert!(a.wants(Some("text/html; charset=utf-8")));
    assert!(!a.wants(Some("image/png")));
    assert!(
        !a.wants(None),
        "with a list, an attachment without a type is not wanted"
    );
    assert_eq!(a.inline_smaller_than, 1024);
    assert_eq!(a.max_bytes, 100 * 1024 * 1024);
    assert_eq!(a.file_origins, ["https://files.example.org"]);
    assert_eq!(
        plan.hydrate,
        ["Medication", "Practitioner"],
        "each type once"
    );
    assert_eq!(
        plan.scope,
        "system/Binary.read system/Medication.read system/Observation.read system/Patient.read system/Practitioner.read"
    );
    // Disabled: no plan, no Binary scope.
    let off = format!("{GOOD}attachments:\n  enabled: false\n");
    let plan = load_plan(&f.write("config.yaml", &off)).unwrap();
    assert!(plan.attachments.is_none());
    assert!(!plan.scope.contains("Binary"));
}

#[test]
fn inline_resources_and_patients() {
    let f = Files::new();
    let yaml = GOOD.replace(
        "    rosterFile: roster.csv\n    resourcesFile: resources.csv\n",
        "    patients: [a1, b2]\n    resources:\n      - type: Condition\n      - type: Observation\n        params: {category: laboratory}\n",
    );
    let plan = load_plan(&f.write("config.yaml", &yaml)).unwrap();
    assert_eq!(plan.search().unwrap().patients, vec!["a1", "b2"]);
    assert_eq!(
        plan.search().unwrap().searches[1].params,
        vec![("category".to_string(), "laboratory".to_string())]
    );
}

#[test]
fn plain_http_is_accepted_for_loopback_and_with_the_opt_in() {
    let f = Files::new();
    for (from, to) in [
        ("https://fhir.example.org", "http://127.0.0.1:8080"),
        ("https://fhir.example.org", "http://localhost:8080"),
        ("https://fhir.example.org", "http://[::1]:8080"),
        (
            "https://fhir.example.org/api/FHIR/R4",
            "http://epic-sandbox.ns.svc:8080/api/FHIR/R4\n  allowInsecureHttp: true",
        ),
    ] {
        let plan = load_plan(&f.write("config.yaml", &GOOD.replace(from, to)));
        assert!(plan.is_ok(), "{to}: {:?}", plan.err());
    }
}

#[test]
fn config_errors_name_the_field_and_the_fix() {
    let f = Files::new();
    let cases: Vec<(String, &[&str])> = vec![
        ("name: [unclosed\n".into(), &["config.yaml"]),
        (
            GOOD.replace("name: nightly\n", ""),
            &["config.yaml", "name"],
        ),
        (GOOD.replace("nightly", "../escape"), &["name", "letters"]),
        (
            GOOD.replace("https://fhir.example.org/api/FHIR/R4", "not a url"),
            &["fhir.baseUrl", "https://"],
        ),
        (
            GOOD.replace("https://fhir.example.org/api/FHIR/R4", "ftp://x/y"),
            &["fhir.baseUrl", "https"],
        ),
        (
            GOOD.replace("clientId: abc", "clientId: ''"),
            &["auth.clientId"],
        ),
        (
            GOOD.replace(
                "privateKeyFile: key.pem",
                "privateKeyFile: key.pem\n  algorithm: HS256",
            ),
            &["auth.algorithm", "RS384"],
        ),
        (GOOD.replace("baseUrl:", "baseURL:"), &["baseURL"]),
        (
            format!("{GOOD}limits:\n  concurrency: 0\n"),
            &["limits.concurrency", "1 to 256"],
        ),
        (
            format!("{GOOD}attachments:\n  enabled: true\n  resources: [Observation]\n"),
            &["attachments.resources[0]", "DocumentReference"],
        ),
        (
            format!("{GOOD}attachments:\n  enabled: true\n  contentTypes: [pdf]\n"),
            &["attachments.contentTypes[0]", "application/pdf"],
        ),
        (
            format!("{GOOD}attachments:\n  enabled: true\n  maxBytes: 0\n"),
            &["attachments.maxBytes", "out of range"],
        ),
        (
            format!("{GOOD}attachments:\n  enabled: true\n  inlineSmallerThan: 99999999\n"),
            &["attachments.inlineSmallerThan", "too large"],
        ),
        (
            format!(
                "{GOOD}attachments:\n  enabled: true\n  fileHosts: [https://files.example.org/notes]\n"
            ),
            &["attachments.fileHosts[0]", "origin"],
        ),
        (
            format!(
                "{GOOD}attachments:\n  enabled: true\n  fileHosts: [http://files.example.org]\n"
            ),
            &["attachments.fileHosts[0]", "https"],
        ),
        (format!("{GOOD}attachments:\n  enable: true\n"), &["enable"]),
        (
            format!("{GOOD}hydrate: [../Medication]\n"),
            &["hydrate[0]", "not a FHIR resource type"],
        ),
        (
            format!("{GOOD}hydrate: [Binary]\n"),
            &["hydrate[0]", "attachments.enabled"],
        ),
        (
            format!("{GOOD}output:\n  keepRuns: 0\n"),
            &["output.keepRuns"],
        ),
        (
            format!("{GOOD}output:\n  url: ftp://host/exports\n"),
            &["output.url", "s3, az, gs or file"],
        ),
        (
            format!("{GOOD}output:\n  url: s3://Bad_Bucket/exports\n"),
            &["output.url", "S3 bucket"],
        ),
        (
            format!("{GOOD}output:\n  url: s3://AKIA:secret@bucket/exports\n"),
            &["output.url", "credentials come from the environment"],
        ),
        (
            format!(
                "{GOOD}output:\n  url: s3://bucket/exports\n  endpoint: http://minio.example.org\n"
            ),
            &["output.endpoint", "loopback"],
        ),
        (
            format!("{GOOD}output:\n  endpoint: https://minio.example.org\n"),
            &["output.endpoint", "output.url"],
        ),
        (
            format!("{GOOD}output:\n  url: s3://bucket/exports\n  partSize: 1048576\n"),
            &["output.partSize", "5 MiB"],
        ),
        (
            format!("{GOOD}output:\n  url: s3://bucket/exports\n  uploadConcurrency: 0\n"),
            &["output.uploadConcurrency", "1 to 64"],
        ),
        (
            format!("{GOOD}output:\n  compression: zstd\n"),
            &["compression", "gzip"],
        ),
        (
            GOOD.replace("    resourcesFile: resources.csv\n", ""),
            &["source.search", "resourcesFile"],
        ),
        (
            GOOD.replace(
                "  search:\n    rosterFile: roster.csv\n    resourcesFile: resources.csv\n",
                "  bulk:\n    level: everything\n",
            ),
            &["source.bulk.level", "patient or system"],
        ),
        (
            GOOD.replace(
                "  search:\n    rosterFile: roster.csv\n    resourcesFile: resources.csv\n",
                "  bulk:\n    group: g1\n    since: yesterday\n",
            ),
            &["source.bulk.since", "auto"],
        ),
        (
            GOOD.replace(
                "  search:\n    rosterFile: roster.csv\n    resourcesFile: resources.csv\n",
                "  bulk:\n    group: g1\n    typeFilters: [laboratory]\n",
            ),
            &["typeFilters[0]", "Observation?category=laboratory"],
        ),
        (
            GOOD.replace(
                "  search:\n    rosterFile: roster.csv\n    resourcesFile: resources.csv\n",
                "  bulk:\n    group: g1\n    fileHosts: [storage]\n",
            ),
            &["fileHosts[0]", "origin"],
        ),
        (
            GOOD.replace(
                "  search:\n    rosterFile: roster.csv\n    resourcesFile: resources.csv\n",
                "  bulk:\n    group: g1\n    level: system\n",
            ),
            &["source.bulk", "not both"],
        ),
        (
            GOOD.replace("roster.csv", "missing.csv"),
            &["missing.csv", "cannot read"],
        ),
        // Plain http only to loopback hosts, unless allowed explicitly.
        (
            GOOD.replace("https://fhir.example.org", "http://fhir.example.org"),
            &["fhir.baseUrl", "plain http", "allowInsecureHttp"],
        ),
        (
            GOOD.replace(
                "https://fhir.example.org/api/FHIR/R4",
                "https://fhir.example.org/api/FHIR/R4\n  tokenUrl: http://login.example.org/token",
            ),
            &["fhir.tokenUrl", "plain http"],
        ),
        (
            GOOD.replace(
                "privateKeyFile: key.pem",
                "privateKeyFile: key.pem\n  jwksUrl: http://keys.example.org/jwks.json",
            ),
            &["auth.jwksUrl", "plain http"],
        ),
        (
            GOOD.replace(
                "  search:\n    rosterFile: roster.csv\n    resourcesFile: resources.csv\n",
                "  bulk:\n    group: g1\n    tokenHosts: [\"http://files.example.org\"]\n",
            ),
            &["source.bulk.tokenHosts[0]", "plain http"],
        ),
        (
            GOOD.replace(
                "  search:\n    rosterFile: roster.csv\n    resourcesFile: resources.csv\n",
                "  bulk:\n    group: g1\n    fileHosts: [\"http://files.example.org\"]\n",
            ),
            &["source.bulk.fileHosts[0]", "plain http"],
        ),
        (
            GOOD.replace(
                "https://fhir.example.org",
                "https://user:pw@fhir.example.org",
            ),
            &["fhir.baseUrl", "credentials"],
        ),
        (
            format!("{GOOD}limits:\n  requestsPerSecond: 0.000001\n"),
            &["limits.requestsPerSecond", "0.01"],
        ),
    ];
    for (yaml, needles) in cases {
        let err = f.err(&yaml);
        for n in needles {
            assert!(
                err.contains(n),
                "{n:?} not in error: {err}\n--- for config:\n{yaml}"
            );
        }
    }
}

#[test]
fn roster_errors_give_file_and_line() {
    let f = Files::new();
    f.write("roster.csv", "name,mrn\nCamila,123\n");
    let err = f.err(GOOD);
    assert!(
        err.contains("roster.csv")
            && err.contains("patient_id")
            && err.contains("columns name, mrn"),
        "{err}"
    );
    // Without a header row the first line is a patient: it is never repeated in the error.
    f.write("roster.csv", "eXy12abc3,Camila Ruiz,MRN 0042\n");
    let err = f.err(GOOD);
    assert!(
        err.contains("3 fields") && err.contains("header row"),
        "{err}"
    );
    for phi in ["eXy12abc3", "Camila", "0042"] {
        assert!(!err.contains(phi), "{phi} in {err}");
    }

    f.write("roster.csv", "fhir_id,name\nabc,A\n\n,Bea\ndef,C\n");
    let plan = load_plan(&f.write("config.yaml", GOOD));
    // An empty id on line 4 is an error naming that line; blank lines are skipped.
    let err = plan.expect_err("empty id").to_string();
    assert!(
        err.contains("roster.csv:4") && err.contains("empty"),
        "{err}"
    );

    f.write("roster.csv", "id\nabc\nMRN 12345\n");
    let err = f.err(GOOD);
    assert!(
        err.contains("roster.csv:3") && err.contains("FHIR id"),
        "{err}"
    );

    f.write("roster.csv", "patient_id\n");
    assert!(f.err(GOOD).contains("no patients"));

    f.write("roster.csv", "\u{feff}patient_id\nabc\nabc\n");
    let plan = load_plan(&f.write("config.yaml", GOOD)).unwrap();
    assert_eq!(
        plan.search().unwrap().patients,
        vec!["abc"],
        "BOM tolerated, duplicates exported once"
    );

    std::fs::write(f.path().join("roster.csv"), b"patient_id\n\xff\xfe\n").unwrap();
    assert!(f.err(GOOD).contains("UTF-8"));
}

#[test]
fn resource_list_errors_give_file_and_line() {
    let f = Files::new();
    f.write(
        "resources.csv",
        "resource_type,search_params\nPatient,\nObservation,\n",
    );
    let err = f.err(GOOD);
    assert!(
        err.contains("resources.csv:3") && err.contains("category"),
        "{err}"
    );

    f.write(
        "resources.csv",
        "resource_type,search_params\nobservation?,category=laboratory\n",
    );
    assert!(f.err(GOOD).contains("resources.csv:2"));

    f.write(
        "resources.csv",
        "resource_type,search_params\nCondition,patient=123\n",
    );
    let err = f.err(GOOD);
    assert!(
        err.contains("resources.csv:2") && err.contains("roster"),
        "{err}"
    );

    f.write("resources.csv", "type,params\nCondition,\n");
    assert!(f.err(GOOD).contains("resource_type,search_params"));

    f.write(
        "resources.csv",
        "resource_type,search_params\nCondition,\"unterminated\n",
    );
    let err = f.err(GOOD);
    assert!(err.contains("resources.csv"), "{err}");
}
