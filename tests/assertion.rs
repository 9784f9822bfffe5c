//! The client assertion, checked with an independent JWT implementation (jsonwebtoken) and the public JWK.

use std::path::PathBuf;

use epic_export::auth::{SigningKey, assertion};
use jsonwebtoken::{DecodingKey, Validation, decode, decode_header, jwk::Jwk};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/keys")
        .join(name)
}

fn verify(key: &SigningKey, jwt: &str, aud: &str) -> Value {
    let jwk: Jwk = serde_json::from_value(key.public_jwk()).unwrap();
    let alg = decode_header(jwt).unwrap().alg;
    let mut v = Validation::new(alg);
    v.set_audience(&[aud]);
    v.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
    decode::<Value>(jwt, &DecodingKey::from_jwk(&jwk).unwrap(), &v)
        .expect("signature and claims verify")
        .claims
}

#[test]
fn rs384_and_es384_assertions_verify_with_the_public_key() {
    let token_url = "https://fhir.example.org/oauth2/token";
    for file in [
        "rsa2048-pkcs8.pem",
        "ec-p384-pkcs8.pem",
        "ec-p256-sec1.pem",
        "rsa2048-pkcs1.pem",
    ] {
        let key = SigningKey::load(&fixture(file), None, None).unwrap();
        let now = epic_export::auth::token::unix_now();
        let jti = assertion::new_jti();
        let claims = assertion::claims("client-123", token_url, &jti, now);
        let jwt =
            assertion::sign(&key, Some("https://keys.example.org/jwks.json"), &claims).unwrap();

        let header = decode_header(&jwt).unwrap();
        assert_eq!(
            format!("{:?}", header.alg),
            key.algorithm().as_str(),
            "{file}"
        );
        assert_eq!(header.typ.as_deref(), Some("JWT"));
        assert_eq!(header.kid.as_deref(), Some(key.kid()));
        assert_eq!(
            header.jku.as_deref(),
            Some("https://keys.example.org/jwks.json")
        );

        let c = verify(&key, &jwt, token_url);
        assert_eq!(c["iss"], "client-123");
        assert_eq!(c["sub"], "client-123");
        assert_eq!(c["aud"], token_url);
        assert_eq!(c["jti"], jti.as_str());
        let exp = c["exp"].as_i64().unwrap();
        assert!(
            exp > now + 200 && exp <= now + 300,
            "exp about 4 minutes ahead, never over 5"
        );
        assert!(c.get("iat").is_none() && c.get("nbf").is_none());

        // Another key's JWK does not verify it.
        let other = SigningKey::generate(key.algorithm()).unwrap();
        let jwk: Jwk = serde_json::from_value(other.public_jwk()).unwrap();
        let mut v = Validation::new(header.alg);
        v.set_audience(&[token_url]);
        assert!(decode::<Value>(&jwt, &DecodingKey::from_jwk(&jwk).unwrap(), &v).is_err());
    }
}

#[test]
fn every_assertion_has_a_fresh_jti() {
    let a = assertion::new_jti();
    let b = assertion::new_jti();
    assert_ne!(a, b);
    assert!(a.len() <= 151);
}

#[test]
fn debug_output_never_shows_key_material() {
    let key = SigningKey::load(&fixture("rsa2048-pkcs1.pem"), None, None).unwrap();
    let shown = format!("{key:?}");
    assert!(shown.contains("RS384") && !shown.contains("MII"));
}
