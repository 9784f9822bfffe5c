//! The original tool's INI file: every key's mapping, its errors, and a whole run from an INI file
//! against the sandbox, with the original CSV file names and Windows-style paths.

mod support;

use std::path::Path;

use epic_export::config::ConfigError;
use epic_export::config::ini::config_from_ini_text;
use epic_export::sandbox::SandboxOptions;
use support::*;

fn read(text: &str) -> Result<epic_export::config::Config, ConfigError> {
    config_from_ini_text(
        text,
        Path::new("/srv/epic/backend_epic_using_jwt.ini"),
        Path::new("/srv/epic"),
        "backend_epic_using_jwt",
    )
}

const FULL: &str = r#"
; the original tool's settings
[paths]
app_folder_name = /srv/fhir/BackendEpic
epic_data_export_folder = ${app_folder_name}\epic_data_export
private_key_path = ${app_folder_name}\keys\privatekey.pem
public_key_path = ${app_folder_name}\keys\publickey.pem
roster_csv = ${app_folder_name}\epic_sandbox_roster.csv
resources_csv = "${app_folder_name}\epic_sandbox_resources.csv"
log_file = ${app_folder_name}\backend_epic.log

[oauth_settings]
client_id = 0b1c-client
token_endpoint = https://fhir.epic.com/interconnect-fhir-oauth/oauth2/token
scope = system/Patient.read system/Observation.read
jwks_url = https://keys.example.org/jwks.json
key_id = key-2026
algorithm = RS384

[email]
smtp_host = 127.0.0.1
smtp_port = 1025
smtp_secure = false
smtp_user = me@example.org
notification_to = team@example.org, oncall@example.org
smtp_password_env = BRIDGE_PASSWORD
"#;

#[test]
fn every_key_maps_to_the_config() {
    let c = read(FULL).unwrap();
    assert_eq!(c.name, "backend_epic_using_jwt");
    assert_eq!(
        c.fhir.base_url, "https://fhir.epic.com/interconnect-fhir-oauth/api/FHIR/R4",
        "derived from token_endpoint"
    );
    assert_eq!(
        c.fhir.token_url.as_deref(),
        Some("https://fhir.epic.com/interconnect-fhir-oauth/oauth2/token")
    );
    assert_eq!(c.auth.client_id, "0b1c-client");
    assert_eq!(
        c.auth.private_key_file,
        Path::new("/srv/fhir/BackendEpic/keys/privatekey.pem"),
        "backslashes become /"
    );
    assert_eq!(
        c.auth.scope.as_deref(),
        Some("system/Patient.read system/Observation.read")
    );
    assert_eq!(
        c.auth.jwks_url.as_deref(),
        Some("https://keys.example.org/jwks.json")
    );
    assert_eq!(c.auth.key_id.as_deref(), Some("key-2026"));
    assert_eq!(c.auth.algorithm.as_deref(), Some("RS384"));
    let search = c.source.search.as_ref().unwrap();
    assert_eq!(
        search.roster_file.as_deref(),
        Some(Path::new("/srv/fhir/BackendEpic/epic_sandbox_roster.csv"))
    );
    assert_eq!(
        search.resources_file.as_deref(),
        Some(Path::new(
            "/srv/fhir/BackendEpic/epic_sandbox_resources.csv"
        )),
        "quotes removed"
    );
    assert_eq!(
        c.output.directory,
        Path::new("/srv/fhir/BackendEpic/epic_data_export")
    );
    let email = c.notify.as_ref().unwrap().email.as_ref().unwrap();
    assert_eq!((email.host.as_str(), email.port), ("127.0.0.1", Some(1025)));
    assert_eq!(
        email.tls.as_deref(),
        Some("starttls"),
        "smtp_secure = false is STARTTLS, as nodemailer does"
    );
    assert_eq!(email.username.as_deref(), Some("me@example.org"));
    assert_eq!(email.from, "me@example.org", "from defaults to smtp_user");
    assert_eq!(email.to, vec!["team@example.org", "oncall@example.org"]);
    assert_eq!(email.password_env.as_deref(), Some("BRIDGE_PASSWORD"));
    assert!(
        email.insecure_skip_verify,
        "a loopback bridge's self-signed certificate is accepted, as before"
    );
    assert_eq!(email.ca_file, None);

    // A remote server over TLS: verified, password from SMTP_PASSWORD by default, explicit base URL.
    let remote = FULL
        .replace(
            "smtp_host = 127.0.0.1",
            "smtp_host = smtp.example.org\nsmtp_from = exports@example.org",
        )
        .replace(
            "smtp_secure = false",
            "smtp_secure = true\nsmtp_ca_file = ${app_folder_name}/ca.pem",
        )
        .replace("smtp_password_env = BRIDGE_PASSWORD", "")
        .replace(
            "scope =",
            "fhir_base_url = https://epic.example.org/FHIR/api/FHIR/R4\nscope =",
        );
    let c = read(&remote).unwrap();
    assert_eq!(c.fhir.base_url, "https://epic.example.org/FHIR/api/FHIR/R4");
    let email = c.notify.as_ref().unwrap().email.as_ref().unwrap();
    assert_eq!(email.tls.as_deref(), Some("tls"));
    assert!(!email.insecure_skip_verify);
    assert_eq!(
        email.ca_file.as_deref(),
        Some(Path::new("/srv/fhir/BackendEpic/ca.pem"))
    );
    assert_eq!(email.from, "exports@example.org");
    assert_eq!(email.password_env.as_deref(), Some("SMTP_PASSWORD"));

    // Without [email] there is no notification; relative paths sit beside the INI file.
    let minimal = "[paths]\nprivate_key_path = keys/private.pem\n[oauth_settings]\nclient_id = x\ntoken_endpoint = https://h.example/oauth2/token\n";
    let c = read(minimal).unwrap();
    assert!(c.notify.is_none());
    assert_eq!(
        c.auth.private_key_file,
        Path::new("/srv/epic/keys/private.pem")
    );
    assert_eq!(
        c.source.search.unwrap().roster_file.unwrap(),
        Path::new("/srv/epic/epic_sandbox_roster.csv")
    );
}

#[test]
fn attachments_and_hydrate_sections() {
    let text = format!(
        "{FULL}\n[attachments]\nenabled = yes\ncontent_types = text/html, text/rtf\nmax_bytes = 5000000\ninline_smaller_than = 2048\nfile_hosts = https://files.example.org\n[hydrate]\ntypes = Medication, Practitioner\n"
    );
    let c = read(&text).unwrap();
    let a = c.attachments.as_ref().unwrap();
    assert!(a.enabled);
    assert_eq!(a.content_types, ["text/html", "text/rtf"]);
    assert_eq!((a.max_bytes, a.inline_smaller_than), (5_000_000, 2048));
    assert_eq!(a.file_hosts, ["https://files.example.org"]);
    assert_eq!(a.resources, None, "the default types");
    assert_eq!(c.hydrate, ["Medication", "Practitioner"]);
    assert!(read(FULL).unwrap().attachments.is_none());

    let bad = format!("{FULL}\n[attachments]\nmax_bytes = 100MB\n");
    let e = read(&bad).unwrap_err().to_string();
    assert!(
        e.contains("[attachments] max_bytes") && e.contains("number of bytes"),
        "{e}"
    );
}

#[test]
fn mistakes_name_the_key_and_line() {
    let err = |text: &str| read(text).expect_err("an error").to_string();

    let e = err(&FULL.replace("client_id = 0b1c-client", ""));
    assert!(
        e.contains("[oauth_settings] client_id") && e.contains("missing"),
        "{e}"
    );
    let e = err(&FULL.replace(
        "private_key_path = ${app_folder_name}\\keys\\privatekey.pem",
        "",
    ));
    assert!(e.contains("[paths] private_key_path"), "{e}");
    let e = err(&FULL.replace(
        "token_endpoint = https://fhir.epic.com/interconnect-fhir-oauth/oauth2/token",
        "token_endpoint = https://auth.example.org/token",
    ));
    assert!(e.contains("fhir_base_url"), "{e}");
    let e = err(&FULL.replace(
        "${app_folder_name}\\epic_data_export",
        "${app_folder}\\epic_data_export",
    ));
    assert!(e.contains(":5:") && e.contains("${app_folder}"), "{e}");
    let e = err(&FULL.replace("/srv/fhir/BackendEpic", r"C:\FHIR\BackendEpic"));
    assert!(
        e.contains("app_folder_name") && e.contains("Windows path"),
        "{e}"
    );
    let e = err(&FULL.replace("smtp_port = 1025", "smtp_port = bridge"));
    assert!(e.contains("[email] smtp_port") && e.contains("line"), "{e}");
    let e = err(&FULL.replace("smtp_secure = false", "smtp_secure = maybe"));
    assert!(e.contains("[email] smtp_secure"), "{e}");
    let e = err(&FULL.replace("notification_to = team@example.org, oncall@example.org", ""));
    assert!(e.contains("[email] notification_to"), "{e}");
    let e = err("client_id = x\n");
    assert!(
        e.contains(":1:") && e.contains("before any [section]"),
        "{e}"
    );
    let e = err(
        "[paths]\na = ${b}\nb = ${a}\nprivate_key_path = ${a}\n[oauth_settings]\nclient_id = x\ntoken_endpoint = https://h/oauth2/token\n",
    );
    assert!(e.contains("cycle"), "{e}");
    // Unknown keys and sections are warned about, not fatal; a plaintext password is ignored.
    read(&format!(
        "{FULL}\nsmtp_password = hunter2\n[pm2]\ninstances = 1\n"
    ))
    .expect("unknown keys are not fatal");
}

#[tokio::test]
async fn a_run_from_the_original_ini_and_csv_files() {
    let env = env(SandboxOptions::default()).await;
    let app = env.path();
    let patients: Vec<String> = env
        .sandbox
        .dataset()
        .patient_ids()
        .iter()
        .take(3)
        .cloned()
        .collect();
    let mut roster = String::from("patient_id,name\n");
    for p in &patients {
        roster.push_str(&format!("{p},Somebody\n"));
    }
    std::fs::write(app.join("epic_sandbox_roster.csv"), roster).unwrap();
    std::fs::write(
        app.join("epic_sandbox_resources.csv"),
        "resource_type,search_params\nPatient,\nCondition,\nObservation,category=laboratory\n",
    )
    .unwrap();
    let ini = format!(
        "[paths]\napp_folder_name = {}\nepic_data_export_folder = ${{app_folder_name}}\\epic_data_export\nprivate_key_path = ${{app_folder_name}}\\keys\\private.pem\n\n[oauth_settings]\nclient_id = {CLIENT_ID}\ntoken_endpoint = {}\n",
        app.display(),
        env.sandbox.token_url()
    );
    let ini_path = app.join("backend_epic_using_jwt.ini");
    std::fs::write(&ini_path, ini).unwrap();

    let out = run_binary(&ini_path).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let latest = app.join("epic_data_export/backend_epic_using_jwt/latest");
    for file in [
        "Patient.ndjson",
        "Condition.ndjson",
        "Observation.ndjson",
        "summary.json",
    ] {
        assert!(latest.join(file).is_file(), "{file} missing");
    }
    let patient_lines = std::fs::read_to_string(latest.join("Patient.ndjson"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(patient_lines, 3);
}
