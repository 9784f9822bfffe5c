//! `epic-export keygen` and `epic-export jwks`: the files and the Kubernetes Secret manifest a new key
//! is handed over in, and the JWK Set of several existing keys.
//!
//! The Secret manifest (`--k8s-secret NAME`) holds the PKCS#8 PEM base64-encoded under `data` (exact
//! bytes, no YAML quoting questions), with the key id in the `fhirexport.dev/kid` annotation. Every
//! scalar is written as a double-quoted string, so names like `null` or `1e3` stay strings. Nothing
//! here prints private key material: the manifest goes to stdout or a 0600 file, never to a log.

use std::path::{Path, PathBuf};

use std::io::{IsTerminal, Write};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::auth::{Algorithm, KeyError, SigningKey, keys};

/// Why `keygen` or `jwks` stopped.
#[derive(Debug, thiserror::Error)]
pub enum KeygenError {
    #[error("--alg must be RS384 or ES384 (the algorithms SMART requires clients to support)")]
    Algorithm,
    #[error("keygen needs --out DIR, --k8s-secret NAME or both")]
    NoDestination,
    #[error(
        "{0} already exists; keygen never overwrites a key: choose another --out folder, or move the old files away first"
    )]
    Exists(String),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "cannot write the Secret manifest to stdout: {0}; the key was not kept anywhere, run keygen again"
    )]
    Stdout(std::io::Error),
    #[error(
        "{kids} --kid values for {keys} --key files: give one kid per key, in the same order, or none (the thumbprints)"
    )]
    KidCount { kids: usize, keys: usize },
    #[error("--kid {0:?} is empty: give the key id of auth.keyId")]
    EmptyKid(String),
    #[error(
        "{first} and {second} have the same kid {kid} (the same key given twice, or the same --kid?); a JWK Set must not repeat a kid: pass each key once, each with its own kid"
    )]
    DuplicateKid {
        first: String,
        second: String,
        kid: String,
    },
}

/// A command-line value that is not a valid Kubernetes name (what clap shows the user).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidName(String);

/// `epic-export keygen`: a new key, written to `out` and/or printed as a Secret manifest on stdout,
/// with what was done on stdout (files) or stderr (beside a manifest on stdout).
pub fn keygen(
    alg: Algorithm,
    out: Option<&Path>,
    target: Option<&SecretTarget>,
) -> Result<(), KeygenError> {
    if !matches!(alg, Algorithm::RS384 | Algorithm::ES384) {
        return Err(KeygenError::Algorithm);
    }
    let key = SigningKey::generate(alg)?;
    match (out, target) {
        (Some(dir), _) => {
            let written = write_files(&key, dir, target)?;
            println!(
                "private key: {} (mode 0600; keep it secret)",
                written.private.display()
            );
            println!(
                "public JWKS: {} (register it with Epic or host it at your JWK Set URL)",
                written.jwks.display()
            );
            if let Some(secret) = &written.secret {
                println!(
                    "Kubernetes Secret: {} (mode 0600; `kubectl apply -f` it)",
                    secret.display()
                );
            }
            println!("kid: {}", key.kid());
        }
        (None, Some(target)) => {
            let manifest = secret_manifest(&key, target)?;
            let mut stdout = std::io::stdout().lock();
            if stdout.is_terminal() {
                eprintln!(
                    "note: this manifest holds the private key; pipe it to `kubectl apply -f -` or add --out DIR to write it to a 0600 file"
                );
            }
            stdout
                .write_all(manifest.as_bytes())
                .and_then(|()| stdout.flush())
                .map_err(KeygenError::Stdout)?;
            eprintln!("kid: {}", key.kid());
            eprintln!(
                "public JWKS (register it with Epic or host it at your JWK Set URL; `epic-export jwks --key FILE` prints it again from the key):\n{:#}",
                keys::jwks(std::slice::from_ref(&key))
            );
        }
        (None, None) => return Err(KeygenError::NoDestination),
    }
    Ok(())
}

/// `epic-export jwks`: the public JWK Set of existing keys, on stdout.
pub fn print_jwks(paths: &[PathBuf], kids: &[String]) -> Result<(), KeygenError> {
    let keys = load_distinct(paths, kids)?;
    println!("{:#}", keys::jwks(&keys));
    Ok(())
}

/// The Secret data key of the signing key, as the EpicExport's `privateKeySecretRef.key` names it.
pub const DEFAULT_SECRET_KEY: &str = "private.pem";
/// The Secret data key under which the next key is staged during a key rotation.
pub const NEXT_SECRET_KEY: &str = "next-private.pem";
/// The annotation holding the key id of the key in a generated Secret.
pub const KID_ANNOTATION: &str = "fhirexport.dev/kid";

/// A Kubernetes Secret name: a DNS-1123 subdomain (at most 253 characters of lowercase letters,
/// digits, `-` and `.`, starting and ending with a letter or digit; each dot-separated part too).
pub fn parse_secret_name(s: &str) -> Result<String, InvalidName> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if s.is_empty() || s.len() > 253 || !s.split('.').all(label_ok) {
        return Err(InvalidName(format!(
            "`{s}` is not a valid Secret name: use at most 253 lowercase letters, digits, '-' and '.', \
             starting and ending with a letter or digit (a DNS-1123 subdomain, e.g. `epic-key`)"
        )));
    }
    Ok(s.to_owned())
}

/// A Kubernetes namespace: a DNS-1123 label (at most 63 lowercase letters, digits and `-`).
pub fn parse_namespace(s: &str) -> Result<String, InvalidName> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if !ok {
        return Err(InvalidName(format!(
            "`{s}` is not a valid namespace: use at most 63 lowercase letters, digits and '-', \
             starting and ending with a letter or digit (a DNS-1123 label, e.g. `phi`)"
        )));
    }
    Ok(s.to_owned())
}

/// A Secret data key: `[-._a-zA-Z0-9]+`, at most 253 characters, not `.` or `..`.
pub fn parse_secret_key(s: &str) -> Result<String, InvalidName> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if !ok {
        return Err(InvalidName(format!(
            "`{s}` is not a valid Secret key: use letters, digits, '-', '.' and '_' only \
             (e.g. `{DEFAULT_SECRET_KEY}`, or `{NEXT_SECRET_KEY}` to stage the next key of a rotation)"
        )));
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
pub fn secret_manifest(key: &SigningKey, target: &SecretTarget) -> Result<String, KeyError> {
    let pem = key.to_pkcs8_pem()?;
    // JSON strings are valid YAML double-quoted scalars.
    let q = |s: &str| serde_json::Value::from(s).to_string();
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
) -> Result<Written, KeygenError> {
    let private = dir.join("private.pem");
    let jwks = dir.join("jwks.json");
    let secret_path = secret.map(|t| dir.join(format!("{}.secret.yaml", t.name)));
    for path in [Some(&private), Some(&jwks), secret_path.as_ref()]
        .into_iter()
        .flatten()
    {
        if path.symlink_metadata().is_ok() {
            return Err(KeygenError::Exists(path.display().to_string()));
        }
    }
    // The manifest is built before anything is written, so an encoding error leaves no files.
    let manifest = secret.map(|t| secret_manifest(key, t)).transpose()?;
    keys::write_key_pair(key, dir)?;
    if let (Some(path), Some(text)) = (&secret_path, manifest) {
        crate::output::write_new_private_file(path, text.as_bytes()).map_err(|source| {
            KeygenError::Write {
                path: path.display().to_string(),
                source,
            }
        })?;
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
pub fn load_distinct(paths: &[PathBuf], kids: &[String]) -> Result<Vec<SigningKey>, KeygenError> {
    if !kids.is_empty() && kids.len() != paths.len() {
        return Err(KeygenError::KidCount {
            kids: kids.len(),
            keys: paths.len(),
        });
    }
    if let Some(bad) = kids.iter().find(|k| k.trim().is_empty()) {
        return Err(KeygenError::EmptyKid(bad.clone()));
    }
    let mut loaded: Vec<(SigningKey, &Path)> = Vec::with_capacity(paths.len());
    for (i, path) in paths.iter().enumerate() {
        let key = SigningKey::load(path, None, kids.get(i).cloned())?;
        if let Some((_, first)) = loaded.iter().find(|(k, _)| k.kid() == key.kid()) {
            return Err(KeygenError::DuplicateKid {
                first: first.display().to_string(),
                second: path.display().to_string(),
                kid: key.kid().to_owned(),
            });
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
