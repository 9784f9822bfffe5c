//! Loading, generating and publishing keys: every accepted format, and a clear error naming the file for
//! each kind of bad key.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use epic_export::auth::{Algorithm, SigningKey, keys};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/keys")
        .join(name)
}

fn load_err(name: &str, alg: Option<Algorithm>) -> String {
    let err = SigningKey::load(&fixture(name), alg, None)
        .expect_err(name)
        .to_string();
    assert!(err.contains(name), "error names the file: {err}");
    err
}

#[test]
fn loads_every_supported_format() {
    for (file, alg) in [
        ("rsa2048-pkcs1.pem", Algorithm::RS384),
        ("rsa2048-pkcs8.pem", Algorithm::RS384),
        ("ec-p256-sec1.pem", Algorithm::ES256),
        ("ec-p384-pkcs8.pem", Algorithm::ES384),
    ] {
        let key =
            SigningKey::load(&fixture(file), None, None).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(key.algorithm(), alg, "{file}: default algorithm");
        assert_eq!(
            key.kid(),
            key.thumbprint(),
            "{file}: default kid is the RFC 7638 thumbprint"
        );
        assert_eq!(key.kid().len(), 43);
    }
    let key = SigningKey::load(
        &fixture("rsa2048-pkcs1.pem"),
        Some(Algorithm::RS256),
        Some("my-key-1".into()),
    )
    .unwrap();
    assert_eq!(key.kid(), "my-key-1");
    assert_eq!(key.algorithm(), Algorithm::RS256);
}

#[test]
fn same_key_in_two_formats_has_one_thumbprint() {
    // Convert the PKCS#1 fixture to PKCS#8 via our own writer and load it again.
    let a = SigningKey::load(&fixture("rsa2048-pkcs1.pem"), None, None).unwrap();
    let pem = a.to_pkcs8_pem().unwrap();
    let b = SigningKey::from_pem(pem.as_bytes(), &PathBuf::from("mem.pem"), None, None).unwrap();
    assert_eq!(a.thumbprint(), b.thumbprint());
    assert_eq!(a.public_jwk(), b.public_jwk());
}

#[test]
fn bad_keys_have_clear_errors() {
    assert!(load_err("rsa1024-short.pem", None).contains("shorter than 2048 bits"));
    assert!(load_err("rsa-encrypted.pem", None).contains("encrypted"));
    assert!(load_err("garbage.pem", None).contains("not a PEM file"));
    assert!(load_err("certificate.pem", None).contains("CERTIFICATE"));
    assert!(load_err("ec-secp256k1.pem", None).contains("P-256 or P-384"));
    let wrong = load_err("rsa2048-pkcs1.pem", Some(Algorithm::ES384));
    assert!(wrong.contains("ES384") && wrong.contains("RSA"), "{wrong}");
    let wrong = load_err("ec-p256-sec1.pem", Some(Algorithm::ES384));
    assert!(
        wrong.contains("P-256") && wrong.contains("ES256"),
        "{wrong}"
    );
    let wrong = load_err("ec-p384-pkcs8.pem", Some(Algorithm::RS384));
    assert!(wrong.contains("RSA"), "{wrong}");
    let missing = SigningKey::load(&fixture("nope.pem"), None, None)
        .unwrap_err()
        .to_string();
    assert!(
        missing.contains("nope.pem") && missing.contains("cannot read"),
        "{missing}"
    );
}

#[test]
fn keygen_writes_private_key_0600_and_jwks() {
    let dir = tempfile::tempdir().unwrap();
    for alg in [Algorithm::RS384, Algorithm::ES384] {
        let out = dir.path().join(alg.as_str());
        let key = SigningKey::generate(alg).unwrap();
        let (private, public) = keys::write_key_pair(&key, &out).unwrap();
        let mode = std::fs::metadata(&private).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let loaded = SigningKey::load(&private, None, None).unwrap();
        assert_eq!(loaded.algorithm(), alg);
        assert_eq!(loaded.kid(), key.kid());
        let jwks: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&public).unwrap()).unwrap();
        assert_eq!(jwks["keys"][0]["kid"], key.kid());
        assert_eq!(jwks["keys"][0]["alg"], alg.as_str());
        assert!(
            jwks["keys"][0].get("d").is_none(),
            "no private member in the JWKS"
        );
        // A second keygen into the same folder must not overwrite the key.
        assert!(keys::write_key_pair(&SigningKey::generate(alg).unwrap(), &out).is_err());
    }
}
