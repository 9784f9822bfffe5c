//! The original Node.js tool's `backend_epic_using_jwt.ini`, read into the same
//! [`Config`](super::Config) as a YAML config, so a migrating user changes nothing but the command.
//!
//! Format: `[section]` headers, `key = value` lines, `;` and `#` comment lines, values optionally in
//! quotes. `${name}` is replaced by the value of `name` in the same section or in `[paths]` (nested,
//! a cycle or an unknown name is an error naming the line). Windows-style paths (`C:\FHIR\Backend`,
//! backslashes) are accepted: backslashes become `/`, and a drive letter is refused on a system
//! without drives, naming the key. Unknown sections and keys are warned about, not fatal; a missing
//! required key is named with its section. The key mapping is documented in docs/src/scheduling.md.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::{Config, ConfigError};

/// The keys this reader understands, per section (aliases included).
const KNOWN: &[(&str, &[&str])] = &[
    (
        "paths",
        &[
            "app_folder_name",
            "epic_data_export_folder",
            "private_key_path",
            "private_key_file",
            "public_key_path",
            "roster_csv",
            "roster_file",
            "resources_csv",
            "resources_file",
            "log_file",
        ],
    ),
    (
        "oauth_settings",
        &[
            "client_id",
            "token_endpoint",
            "fhir_base_url",
            "fhir_api_base",
            "scope",
            "jwks_url",
            "key_id",
            "algorithm",
        ],
    ),
    (
        "schedule",
        &["cron", "time_zone", "starting_deadline_seconds"],
    ),
    (
        "attachments",
        &[
            "enabled",
            "resources",
            "content_types",
            "inline_smaller_than",
            "max_bytes",
            "file_hosts",
            "token_hosts",
        ],
    ),
    ("hydrate", &["types"]),
    (
        "email",
        &[
            "smtp_host",
            "smtp_port",
            "smtp_secure",
            "smtp_user",
            "smtp_from",
            "notification_to",
            "smtp_password_env",
            "smtp_ca_file",
            "smtp_password",
            "smtp_pass",
        ],
    ),
];

/// The environment variable holding the SMTP password unless `[email] smtp_password_env` names another.
pub const DEFAULT_PASSWORD_ENV: &str = "SMTP_PASSWORD";

/// One `key = value` line.
#[derive(Clone, Debug)]
struct Entry {
    value: String,
    line: usize,
}

type Sections = BTreeMap<String, BTreeMap<String, Entry>>;

/// Reads the INI file at `path` into a [`Config`]; relative paths are anchored at `app_folder_name`
/// (or the INI file's folder).
pub fn config_from_ini(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("epic")
        .to_owned();
    config_from_ini_text(&text, path, dir, &name)
}

pub fn config_from_ini_text(
    text: &str,
    path: &Path,
    dir: &Path,
    name: &str,
) -> Result<Config, ConfigError> {
    let sections = parse(text, path)?;
    warn_unknown(&sections, path);
    let ini = Resolved {
        sections: &sections,
        path,
    };

    let app = match ini.get("paths", "app_folder_name")? {
        Some(p) => dir.join(ini.path_value("paths", "app_folder_name", &p)?),
        None => dir.to_owned(),
    };
    let file = |keys: &[&str], default: &str| -> Result<PathBuf, ConfigError> {
        for key in keys {
            if let Some(v) = ini.get("paths", key)? {
                return Ok(app.join(ini.path_value("paths", key, &v)?));
            }
        }
        Ok(app.join(default))
    };
    let output = file(&["epic_data_export_folder"], "epic_data_export")?;
    let roster = file(&["roster_csv", "roster_file"], "epic_sandbox_roster.csv")?;
    let resources = file(
        &["resources_csv", "resources_file"],
        "epic_sandbox_resources.csv",
    )?;
    let key = match ini.first("paths", &["private_key_path", "private_key_file"])? {
        Some((k, v)) => app.join(ini.path_value("paths", k, &v)?),
        None => {
            return Err(ini.missing(
                "paths",
                "private_key_path",
                "the PEM private key whose public key is registered with Epic",
            ));
        }
    };

    let client_id = ini
        .get("oauth_settings", "client_id")?
        .ok_or_else(|| ini.missing("oauth_settings", "client_id", "your Epic app's client id"))?;
    let token_url = ini.get("oauth_settings", "token_endpoint")?;
    let base_url = match ini.first("oauth_settings", &["fhir_base_url", "fhir_api_base"])? {
        Some((_, v)) => v,
        None => match token_url
            .as_deref()
            .and_then(|t| t.strip_suffix("/oauth2/token"))
        {
            // Epic's layout: .../oauth2/token beside .../api/FHIR/R4.
            Some(root) => format!("{root}/api/FHIR/R4"),
            None => {
                return Err(ini.missing(
                    "oauth_settings",
                    "fhir_base_url",
                    "the FHIR R4 base URL (it can only be derived from a token_endpoint ending in /oauth2/token)",
                ));
            }
        },
    };
    let mut auth = json!({
        "clientId": client_id,
        "privateKeyFile": key,
    });
    for (ini_key, field) in [
        ("scope", "scope"),
        ("jwks_url", "jwksUrl"),
        ("key_id", "keyId"),
        ("algorithm", "algorithm"),
    ] {
        if let Some(v) = ini.get("oauth_settings", ini_key)? {
            auth[field] = json!(v);
        }
    }
    let mut fhir = json!({ "baseUrl": base_url });
    if let Some(t) = token_url {
        fhir["tokenUrl"] = json!(t);
    }
    let mut config = json!({
        "name": name,
        "fhir": fhir,
        "auth": auth,
        "source": { "search": { "rosterFile": roster, "resourcesFile": resources } },
        "output": { "directory": output },
    });
    if let Some(email) = email(&ini, &app)? {
        config["notify"] = json!({ "email": email });
    }
    if let Some(a) = attachments(&ini)? {
        config["attachments"] = a;
    }
    if let Some(types) = ini.get("hydrate", "types")? {
        config["hydrate"] = json!(list(&types));
    }
    serde_json::from_value(config).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// `[email]` as `notify.email`, or `None` without an `[email]` section.
fn email(ini: &Resolved<'_>, app: &Path) -> Result<Option<Value>, ConfigError> {
    if !ini.sections.contains_key("email") {
        return Ok(None);
    }
    for plain in ["smtp_password", "smtp_pass"] {
        if ini.get("email", plain)?.is_some() {
            tracing::warn!(
                "{}: [email] {plain} is ignored: a password does not belong in a config file; put it in the environment variable {} (or name another with smtp_password_env)",
                ini.path.display(),
                DEFAULT_PASSWORD_ENV
            );
        }
    }
    let host = ini.get("email", "smtp_host")?.ok_or_else(|| {
        ini.missing(
            "email",
            "smtp_host",
            "the SMTP server, e.g. 127.0.0.1 for ProtonMail Bridge",
        )
    })?;
    let to: Vec<String> = ini
        .get("email", "notification_to")?
        .ok_or_else(|| ini.missing("email", "notification_to", "who gets the run summary"))?
        .split([',', ';'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let user = ini.get("email", "smtp_user")?;
    let from = match (ini.get("email", "smtp_from")?, &user) {
        (Some(f), _) => f,
        (None, Some(u)) => u.clone(),
        (None, None) => {
            return Err(ini.missing("email", "smtp_from", "the sender address (or smtp_user)"));
        }
    };
    // nodemailer's `secure: false` is STARTTLS when offered; `secure: true` is TLS from the start.
    let secure = match ini.get("email", "smtp_secure")?.as_deref() {
        None => false,
        Some(v) => {
            parse_bool(v).ok_or_else(|| ini.invalid("email", "smtp_secure", "use true or false"))?
        }
    };
    let mut email = json!({
        "host": host,
        "tls": if secure { "tls" } else { "starttls" },
        "from": from,
        "to": to,
    });
    if let Some(port) = ini.get("email", "smtp_port")? {
        let port: u16 = port
            .parse()
            .map_err(|_| ini.invalid("email", "smtp_port", "use a port number, e.g. 1025"))?;
        email["port"] = json!(port);
    }
    if let Some(u) = user {
        email["username"] = json!(u);
        email["passwordEnv"] = json!(
            ini.get("email", "smtp_password_env")?
                .unwrap_or_else(|| DEFAULT_PASSWORD_ENV.to_owned())
        );
    }
    match ini.get("email", "smtp_ca_file")? {
        Some(ca) => {
            email["caFile"] = json!(app.join(ini.path_value("email", "smtp_ca_file", &ca)?))
        }
        // A local bridge (ProtonMail Bridge) presents a self-signed certificate, which the original
        // tool accepted; keep that for loopback hosts only (never for a remote server).
        None if email["host"]
            .as_str()
            .is_some_and(crate::trust::is_loopback_host) =>
        {
            email["insecureSkipVerify"] = json!(true)
        }
        None => {}
    }
    Ok(Some(email))
}

/// A comma-separated INI value as a list (blanks dropped).
fn list(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `[attachments]` as `attachments` (not in the original tool), or `None` without that section.
fn attachments(ini: &Resolved<'_>) -> Result<Option<Value>, ConfigError> {
    if !ini.sections.contains_key("attachments") {
        return Ok(None);
    }
    let enabled = match ini.get("attachments", "enabled")?.as_deref() {
        None => true,
        Some(v) => parse_bool(v)
            .ok_or_else(|| ini.invalid("attachments", "enabled", "use true or false"))?,
    };
    let mut a = json!({ "enabled": enabled });
    for (key, field) in [
        ("resources", "resources"),
        ("content_types", "contentTypes"),
        ("file_hosts", "fileHosts"),
        ("token_hosts", "tokenHosts"),
    ] {
        if let Some(v) = ini.get("attachments", key)? {
            a[field] = json!(list(&v));
        }
    }
    for (key, field) in [
        ("inline_smaller_than", "inlineSmallerThan"),
        ("max_bytes", "maxBytes"),
    ] {
        if let Some(v) = ini.get("attachments", key)? {
            let n: u64 = v.parse().map_err(|_| {
                ini.invalid("attachments", key, "use a number of bytes, e.g. 104857600")
            })?;
            a[field] = json!(n);
        }
    }
    Ok(Some(a))
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" | "on" => Some(true),
        "false" | "no" | "0" | "off" => Some(false),
        _ => None,
    }
}

/// `[schedule]` of an INI config (`cron`, `time_zone`, `starting_deadline_seconds`; not in the
/// original tool, whose scheduler had its own), or `None` without that section.
pub fn schedule_from_ini(path: &Path) -> Result<Option<super::ScheduleConfig>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let sections = parse(&text, path)?;
    if !sections.contains_key("schedule") {
        return Ok(None);
    }
    let ini = Resolved {
        sections: &sections,
        path,
    };
    let cron = ini
        .get("schedule", "cron")?
        .ok_or_else(|| ini.missing("schedule", "cron", "e.g. 0 2 * * * for 02:00 every day"))?;
    let starting_deadline_seconds = match ini.get("schedule", "starting_deadline_seconds")? {
        None => None,
        Some(v) => Some(v.parse().map_err(|_| {
            ini.invalid(
                "schedule",
                "starting_deadline_seconds",
                "use a number of seconds",
            )
        })?),
    };
    Ok(Some(super::ScheduleConfig {
        cron,
        time_zone: ini.get("schedule", "time_zone")?,
        starting_deadline_seconds,
    }))
}

/// The log file of an INI config: `[paths] log_file`, else `backend_epic.log` in `app_folder_name`
/// (or beside the INI file), as the original tool wrote. `None` for other configs or an unreadable
/// INI (whose error the run reports).
pub fn log_file(path: &Path) -> Option<PathBuf> {
    if !path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("ini"))
    {
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    let sections = parse(&text, path).ok()?;
    let ini = Resolved {
        sections: &sections,
        path,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let app = match ini.get("paths", "app_folder_name").ok()? {
        Some(p) => dir.join(ini.path_value("paths", "app_folder_name", &p).ok()?),
        None => dir.to_owned(),
    };
    Some(match ini.get("paths", "log_file").ok()? {
        Some(f) => app.join(ini.path_value("paths", "log_file", &f).ok()?),
        None => app.join("backend_epic.log"),
    })
}

fn parse(text: &str, path: &Path) -> Result<Sections, ConfigError> {
    let mut sections = Sections::new();
    let mut current: Option<String> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let l = raw.trim().trim_start_matches('\u{feff}');
        if l.is_empty() || l.starts_with(';') || l.starts_with('#') {
            continue;
        }
        if let Some(rest) = l.strip_prefix('[') {
            let name = rest.strip_suffix(']').ok_or_else(|| ConfigError::Csv {
                path: path.to_owned(),
                line: line as u64,
                message: format!("{l:?} is not a section header: write [name]"),
            })?;
            let name = name.trim().to_ascii_lowercase();
            sections.entry(name.clone()).or_default();
            current = Some(name);
            continue;
        }
        let Some((key, value)) = l.split_once('=') else {
            return Err(ConfigError::Csv {
                path: path.to_owned(),
                line: line as u64,
                message: format!("{l:?} is neither [section] nor key = value"),
            });
        };
        let Some(section) = &current else {
            return Err(ConfigError::Csv {
                path: path.to_owned(),
                line: line as u64,
                message: "a key before any [section]".into(),
            });
        };
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
            .unwrap_or(value);
        sections.entry(section.clone()).or_default().insert(
            key.trim().to_ascii_lowercase(),
            Entry {
                value: value.to_owned(),
                line,
            },
        );
    }
    Ok(sections)
}

fn warn_unknown(sections: &Sections, path: &Path) {
    for (section, entries) in sections {
        match KNOWN.iter().find(|(s, _)| s == section) {
            None => tracing::warn!("{}: unknown section [{section}] is ignored", path.display()),
            Some((_, keys)) => {
                for (key, entry) in entries {
                    if !keys.contains(&key.as_str()) {
                        tracing::warn!(
                            "{}:{}: unknown key [{section}] {key} is ignored",
                            path.display(),
                            entry.line
                        );
                    }
                }
            }
        }
    }
}

struct Resolved<'a> {
    sections: &'a Sections,
    path: &'a Path,
}

impl Resolved<'_> {
    /// The value with `${...}` replaced, or `None` when the key is absent or empty.
    fn get(&self, section: &str, key: &str) -> Result<Option<String>, ConfigError> {
        let Some(entry) = self.sections.get(section).and_then(|s| s.get(key)) else {
            return Ok(None);
        };
        let value = self.interpolate(section, &entry.value, entry.line, 0)?;
        Ok(Some(value).filter(|v| !v.trim().is_empty()))
    }

    /// The first of `keys` that is set.
    fn first<'k>(
        &self,
        section: &str,
        keys: &[&'k str],
    ) -> Result<Option<(&'k str, String)>, ConfigError> {
        for key in keys {
            if let Some(v) = self.get(section, key)? {
                return Ok(Some((key, v)));
            }
        }
        Ok(None)
    }

    fn interpolate(
        &self,
        section: &str,
        value: &str,
        line: usize,
        depth: usize,
    ) -> Result<String, ConfigError> {
        let mut out = String::new();
        let mut rest = value;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| self.at(line, format!("unclosed ${{ in {value:?}")))?;
            let name = after[..end].trim().to_ascii_lowercase();
            if depth > 10 {
                return Err(self.at(line, format!("${{{name}}} refers to itself (a cycle)")));
            }
            let entry = self
                .sections
                .get(section)
                .and_then(|s| s.get(&name))
                .or_else(|| self.sections.get("paths").and_then(|s| s.get(&name)))
                .ok_or_else(|| {
                    self.at(
                        line,
                        format!("${{{name}}} is not a key of [{section}] or [paths]"),
                    )
                })?;
            out.push_str(&self.interpolate(section, &entry.value, entry.line, depth + 1)?);
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }

    /// A path value with Windows separators made portable.
    fn path_value(&self, section: &str, key: &str, value: &str) -> Result<PathBuf, ConfigError> {
        let bytes = value.as_bytes();
        let has_drive = bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':';
        if has_drive && !cfg!(windows) {
            return Err(self.invalid(
                section,
                key,
                &format!("{value:?} is a Windows path; on this system give a path such as /srv/fhir/BackendEpic"),
            ));
        }
        Ok(PathBuf::from(if cfg!(windows) {
            value.to_owned()
        } else {
            value.replace('\\', "/")
        }))
    }

    fn at(&self, line: usize, message: String) -> ConfigError {
        ConfigError::Csv {
            path: self.path.to_owned(),
            line: line as u64,
            message,
        }
    }

    fn missing(&self, section: &str, key: &str, what: &str) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            field: format!("[{section}] {key}"),
            message: format!("is missing: add `{key} = ...` under [{section}] ({what})"),
        }
    }

    fn invalid(&self, section: &str, key: &str, message: &str) -> ConfigError {
        let line = self
            .sections
            .get(section)
            .and_then(|s| s.get(key))
            .map(|e| e.line)
            .unwrap_or(0);
        ConfigError::Invalid {
            path: self.path.to_owned(),
            field: format!("[{section}] {key} (line {line})"),
            message: message.to_owned(),
        }
    }
}
