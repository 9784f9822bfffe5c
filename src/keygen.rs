//! `epic-export keygen` and `epic-export jwks`: the files and the Kubernetes Secret manifest a new key
//! is handed over in, and the JWK Set of several existing keys.
//!
//! The Secret manifest (`--k8s-secret NAME`) holds the PKCS#8 PEM base64-encoded under `data` (exact
//! bytes, no YAML quoting questions), with the key id in the `fhirexport.dev/kid` annotation. Every
//! scalar is written as a double-quoted string, so names like `null` or `1e3` stay strings. Nothing
//! here prints private key material: the manifest goes to stdout or a 0600 file, never to a log.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::auth::{SigningKey, keys};

/// The Secret data key of the signing key, as the EpicExport's `privateKeySecretRef.key` names it.
pub const DEFAULT_SECRET_KEY: &str = "private.pem";
/// The Secret data key under which the next key is staged during a key rotation.
pub const NEXT_SECRET_KEY: &str = "next-private.pem";
/// The annotation holding the key id of the key in a generated Secret.
pub const KID_ANNOTATION: &str = "fhirexport.dev/kid";

/// A Kubernetes Secret name: a DNS-1123 subdomain (at most 253 characters of lowercase letters,
/// digits, `-` and `.`, starting and ending with a letter or digit; each dot-separated part too).
pub fn parse_secret_name(s: &str) -> Result<String, String> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if s.is_empty() || s.len() > 253 || !s.split('.').all(label_ok) {
        return Err(format!(
            "`{s}` is not a valid Secret name: use at most 253 lowercase letters, digits, '-' and '.', \
             starting and ending with a letter or digit (a DNS-1123 subdomain, e.g. `epic-key`)"
        ));
    }
    Ok(s.to_owned())
}

/// A Kubernetes namespace: a DNS-1123 label (at most 63 lowercase letters, digits and `-`).
pub fn parse_namespace(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if !ok {
        return Err(format!(
            "`{s}` is not a valid namespace: use at most 63 lowercase letters, digits and '-', \
             starting and ending with a letter or digit (a DNS-1123 label, e.g. `phi`)"
        ));
    }
    Ok(s.to_owned())
}

/// A Secret data key: `[-._a-zA-Z0-9]+`, at most 253 characters, not `.` or `..`.
pub fn parse_secret_key(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if !ok {
        return Err(format!(
            "`{s}` is not a valid Secret key: use letters, digits, '-', '.' and '_' only \
             (e.g. `{DEFAULT_SECRET_KEY}`, or `{NEXT_SECRET_KEY}` to stage the next key of a rotation)"
        ));
    }
    Ok(s.to_owned())
}

/// Where `--k8s-secret` puts the key.
#[derive(Clone, Debug)]
pub struct SecretTarget {
    pub name: String,
    pub namespace: Option<String>,
    pub key: String,
}

/// The Secret manifest (YAML) holding `key`'s PKCS#8 PEM under `target.key`.
pub fn secret_manifest(key: &SigningKey, target: &SecretTarget) -> anyhow::Result<String> {
    let pem = key.to_pkcs8_pem()?;
    // JSON strings are valid YAML double-quoted scalars.
    let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let mut out = format!(
        "# Written by `epic-export keygen`: the private key of kid {kid} ({alg}). Keep it secret;\n\
         # register the public JWKS (`epic-export jwks --key FILE`) with Epic or host it at your JWK Set URL.\n\
         apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n",
        kid = key.kid(),
        alg = key.algorithm(),
        name = q(&target.name),
    );
    if let Some(ns) = &target.namespace {
        out.push_str(&format!("  namespace: {}\n", q(ns)));
    }
    out.push_str(&format!(
        "  annotations:\n    {}: {}\ntype: Opaque\ndata:\n  {}: {}\n",
        q(KID_ANNOTATION),
        q(key.kid()),
        q(&target.key),
        q(&STANDARD.encode(pem.as_bytes())),
    ));
    Ok(out)
}

/// What `keygen` wrote into a folder.
#[derive(Debug)]
pub struct Written {
    pub private: PathBuf,
    pub jwks: PathBuf,
    pub secret: Option<PathBuf>,
}

/// Writes `dir/private.pem` (0600), `dir/jwks.json` and, with a target, `dir/NAME.secret.yaml` (0600).
/// Refuses before writing anything if any of them exists: a key is never overwritten.
pub fn write_files(
    key: &SigningKey,
    dir: &Path,
    secret: Option<&SecretTarget>,
) -> anyhow::Result<Written> {
    let private = dir.join("private.pem");
    let jwks = dir.join("jwks.json");
    let secret_path = secret.map(|t| dir.join(format!("{}.secret.yaml", t.name)));
    for path in [Some(&private), Some(&jwks), secret_path.as_ref()]
        .into_iter()
        .flatten()
    {
        if path.symlink_metadata().is_ok() {
            bail!(
                "{} already exists; keygen never overwrites a key: choose another --out folder, or move the old files away first",
                path.display()
            );
        }
    }
    // The manifest is built before anything is written, so an encoding error leaves no files.
    let manifest = secret.map(|t| secret_manifest(key, t)).transpose()?;
    keys::write_key_pair(key, dir)?;
    if let (Some(path), Some(text)) = (&secret_path, manifest) {
        crate::output::write_new_private_file(path, text.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(Written {
        private,
        jwks,
        secret: secret_path,
    })
}

/// Loads the keys for `epic-export jwks`, with the given kids (none: the thumbprints; else one per
/// key, in order), and refuses two keys with the same `kid` (a JWK Set URL with a duplicate kid
/// leaves the verifier guessing).
pub fn load_distinct(paths: &[PathBuf], kids: &[String]) -> anyhow::Result<Vec<SigningKey>> {
    if !kids.is_empty() && kids.len() != paths.len() {
        bail!(
            "{} --kid values for {} --key files: give one kid per key, in the same order, or none (the thumbprints)",
            kids.len(),
            paths.len()
        );
    }
    if let Some(bad) = kids.iter().find(|k| k.trim().is_empty()) {
        bail!("--kid {bad:?} is empty: give the key id of auth.keyId");
    }
    let mut loaded: Vec<(SigningKey, &Path)> = Vec::with_capacity(paths.len());
    for (i, path) in paths.iter().enumerate() {
        let key = SigningKey::load(path, None, kids.get(i).cloned())?;
        if let Some((_, first)) = loaded.iter().find(|(k, _)| k.kid() == key.kid()) {
            bail!(
                "{} and {} have the same kid {} (the same key given twice, or the same --kid?); a JWK Set must not repeat a kid: pass each key once, each with its own kid",
                first.display(),
                path.display(),
                key.kid()
            );
        }
        loaded.push((key, path));
    }
    Ok(loaded.into_iter().map(|(k, _)| k).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_keys_are_validated() {
        for ok in ["epic-key", "a", "epic.key-1", "0abc"] {
            assert!(parse_secret_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Epic",
            "-a",
            "a-",
            "a..b",
            "a_b",
            ".a",
            &"a".repeat(254),
        ] {
            assert!(parse_secret_name(bad).is_err(), "{bad}");
        }
        assert!(parse_namespace("phi").is_ok());
        assert!(parse_namespace("a.b").is_err());
        for ok in ["private.pem", "next-private.pem", "A_b.-9"] {
            assert!(parse_secret_key(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "ключ"] {
            assert!(parse_secret_key(bad).is_err(), "{bad}");
        }
    }
}
