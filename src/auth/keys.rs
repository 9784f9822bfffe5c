//! Private signing keys: loading PEM files, generating new keys, and publishing the public half as a JWKS.
//!
//! Accepted formats: PKCS#8 (`PRIVATE KEY`) and PKCS#1 (`RSA PRIVATE KEY`) RSA keys of at least 2048 bits,
//! and PKCS#8 or SEC1 (`EC PRIVATE KEY`) EC keys on P-256 or P-384. The default key id is the RFC 7638
//! thumbprint of the public key, so the `kid` we send always matches the JWKS we printed.
//! This module does no networking; signing a JWT lives in `assertion`.

use std::fmt;
use std::path::{Path, PathBuf};

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

/// The smallest RSA modulus Epic (and we) accept.
pub const MIN_RSA_BITS: usize = 2048;

/// JWS algorithms we can sign client assertions with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Algorithm {
    RS256,
    RS384,
    RS512,
    ES256,
    ES384,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::RS256 => "RS256",
            Algorithm::RS384 => "RS384",
            Algorithm::RS512 => "RS512",
            Algorithm::ES256 => "ES256",
            Algorithm::ES384 => "ES384",
        }
    }

    pub fn is_rsa(self) -> bool {
        matches!(self, Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512)
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An algorithm name this tool does not sign with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported algorithm {0:?}: use RS384 (default), ES384, RS256, RS512 or ES256")]
pub struct UnknownAlgorithm(pub String);

impl std::str::FromStr for Algorithm {
    type Err = UnknownAlgorithm;
    fn from_str(s: &str) -> Result<Self, UnknownAlgorithm> {
        match s.to_ascii_uppercase().as_str() {
            "RS256" => Ok(Algorithm::RS256),
            "RS384" => Ok(Algorithm::RS384),
            "RS512" => Ok(Algorithm::RS512),
            "ES256" => Ok(Algorithm::ES256),
            "ES384" => Ok(Algorithm::ES384),
            other => Err(UnknownAlgorithm(other.to_owned())),
        }
    }
}

/// Why a key could not be loaded or made. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("private key file {path}: cannot read it: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "private key file {path}: not a PEM file ({detail}); expected '-----BEGIN PRIVATE KEY-----', 'RSA PRIVATE KEY' or 'EC PRIVATE KEY'"
    )]
    NotPem { path: PathBuf, detail: String },
    #[error(
        "private key file {path}: the key is encrypted; store it unencrypted with mode 0600 (e.g. `openssl pkcs8 -topk8 -nocrypt -in KEY -out private.pem`) and protect the file instead"
    )]
    Encrypted { path: PathBuf },
    #[error(
        "private key file {path}: PEM block '{label}' is not a private key; expected PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY"
    )]
    WrongLabel { path: PathBuf, label: String },
    #[error("private key file {path}: the content is not a valid {kind} private key")]
    Invalid { path: PathBuf, kind: &'static str },
    #[error(
        "private key file {path}: the RSA key is shorter than {MIN_RSA_BITS} bits, the minimum Epic accepts; generate a new one with `epic-export keygen`"
    )]
    RsaTooShort { path: PathBuf },
    #[error(
        "private key file {path}: algorithm {alg} needs {needs}, but the file holds {has}; set auth.algorithm to {suggest} or use another key"
    )]
    WrongType {
        path: PathBuf,
        alg: Algorithm,
        needs: &'static str,
        has: String,
        suggest: String,
    },
    #[error("cannot generate a key: {0}")]
    Generate(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

enum Inner {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair, Curve),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Curve {
    P256,
    P384,
}

impl Curve {
    fn name(self) -> &'static str {
        match self {
            Curve::P256 => "P-256",
            Curve::P384 => "P-384",
        }
    }
    fn algorithm(self) -> Algorithm {
        match self {
            Curve::P256 => Algorithm::ES256,
            Curve::P384 => Algorithm::ES384,
        }
    }
}

/// A loaded private key, ready to sign with one algorithm, and its key id.
pub struct SigningKey {
    inner: Inner,
    alg: Algorithm,
    kid: String,
    source: String,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Loads a PEM private key. `alg` defaults to RS384 for RSA keys and ES256/ES384 by curve for EC keys.
    pub fn load(
        path: &Path,
        alg: Option<Algorithm>,
        kid: Option<String>,
    ) -> Result<Self, KeyError> {
        let bytes = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_pem(&bytes, path, alg, kid)
    }

    /// Parses PEM bytes; `path` is only used in error messages.
    pub fn from_pem(
        bytes: &[u8],
        path: &Path,
        alg: Option<Algorithm>,
        kid: Option<String>,
    ) -> Result<Self, KeyError> {
        let p = || path.to_owned();
        let text = String::from_utf8_lossy(bytes);
        if text.contains("ENCRYPTED PRIVATE KEY") || text.contains("Proc-Type: 4,ENCRYPTED") {
            return Err(KeyError::Encrypted { path: p() });
        }
        let block = pem::parse(bytes).map_err(|e| KeyError::NotPem {
            path: p(),
            detail: e.to_string(),
        })?;
        let der = block.contents();
        let inner = match block.tag() {
            "RSA PRIVATE KEY" => {
                Inner::Rsa(RsaKeyPair::from_der(der).map_err(|e| rsa_error(e, path, "PKCS#1 RSA"))?)
            }
            "EC PRIVATE KEY" => parse_ec(der).ok_or(KeyError::Invalid {
                path: p(),
                kind: "SEC1 EC (P-256 or P-384)",
            })?,
            "PRIVATE KEY" => match RsaKeyPair::from_pkcs8(der) {
                Ok(k) => Inner::Rsa(k),
                Err(e) if e.description_() == "TooSmall" => {
                    return Err(rsa_error(e, path, "PKCS#8 RSA"));
                }
                Err(_) => parse_ec(der).ok_or(KeyError::Invalid {
                    path: p(),
                    kind: "PKCS#8 RSA or EC (P-256/P-384)",
                })?,
            },
            other => {
                return Err(KeyError::WrongLabel {
                    path: p(),
                    label: other.to_owned(),
                });
            }
        };
        let alg = match (&inner, alg) {
            (Inner::Rsa(k), alg) => {
                let bits = k.public_modulus_len() * 8;
                if bits < MIN_RSA_BITS {
                    return Err(KeyError::RsaTooShort { path: p() });
                }
                match alg {
                    None => Algorithm::RS384,
                    Some(a) if a.is_rsa() => a,
                    Some(a) => {
                        return Err(KeyError::WrongType {
                            path: p(),
                            alg: a,
                            needs: if a == Algorithm::ES256 {
                                "an EC P-256 key"
                            } else {
                                "an EC P-384 key"
                            },
                            has: format!("an RSA key ({bits} bits)"),
                            suggest: "RS384".into(),
                        });
                    }
                }
            }
            (Inner::Ec(_, curve), alg) => match alg {
                None => curve.algorithm(),
                Some(a) if a == curve.algorithm() => a,
                Some(a) => {
                    return Err(KeyError::WrongType {
                        path: p(),
                        alg: a,
                        needs: match a {
                            Algorithm::ES256 => "an EC P-256 key",
                            Algorithm::ES384 => "an EC P-384 key",
                            _ => "an RSA key",
                        },
                        has: format!("an EC {} key", curve.name()),
                        suggest: curve.algorithm().to_string(),
                    });
                }
            },
        };
        let mut key = SigningKey {
            inner,
            alg,
            kid: String::new(),
            source: path.display().to_string(),
        };
        key.kid = kid.unwrap_or_else(|| key.thumbprint());
        Ok(key)
    }

    /// Generates a new key for `alg` (RSA keys are 3072 bits).
    pub fn generate(alg: Algorithm) -> Result<Self, KeyError> {
        let gen_err =
            |_| KeyError::Generate(format!("the crypto library could not generate a {alg} key"));
        let inner = match alg {
            Algorithm::ES256 => Inner::Ec(
                EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_FIXED_SIGNING)
                    .map_err(gen_err)?,
                Curve::P256,
            ),
            Algorithm::ES384 => Inner::Ec(
                EcdsaKeyPair::generate(&signature::ECDSA_P384_SHA384_FIXED_SIGNING)
                    .map_err(gen_err)?,
                Curve::P384,
            ),
            _ => Inner::Rsa(RsaKeyPair::generate(KeySize::Rsa3072).map_err(gen_err)?),
        };
        let mut key = SigningKey {
            inner,
            alg,
            kid: String::new(),
            source: "generated".into(),
        };
        key.kid = key.thumbprint();
        Ok(key)
    }

    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The private key as PKCS#8 PEM.
    pub fn to_pkcs8_pem(&self) -> Result<String, KeyError> {
        let err = |_| KeyError::Generate("cannot encode the key as PKCS#8".into());
        let der: Vec<u8> = match &self.inner {
            Inner::Rsa(k) => k.as_der().map_err(err)?.as_ref().to_vec(),
            Inner::Ec(k, _) => k.to_pkcs8v1().map_err(err)?.as_ref().to_vec(),
        };
        Ok(pem::encode(&pem::Pem::new("PRIVATE KEY", der)))
    }

    /// The public key as a JWK with `kid`, `alg` and `use: sig`.
    pub fn public_jwk(&self) -> Value {
        let mut jwk = self.thumbprint_members();
        let obj = jwk
            .as_object_mut()
            .expect("thumbprint members are an object");
        obj.insert("kid".into(), Value::String(self.kid.clone()));
        obj.insert("alg".into(), Value::String(self.alg.to_string()));
        obj.insert("use".into(), Value::String("sig".into()));
        jwk
    }

    /// The RFC 7638 required members, which is also the public JWK's core.
    fn thumbprint_members(&self) -> Value {
        match &self.inner {
            Inner::Rsa(k) => {
                let public = k.public_key();
                json!({
                    "e": b64(public.exponent().big_endian_without_leading_zero()),
                    "kty": "RSA",
                    "n": b64(public.modulus().big_endian_without_leading_zero()),
                })
            }
            Inner::Ec(k, curve) => {
                // Uncompressed point: 0x04 || x || y.
                let point = k.public_key().as_ref();
                let half = (point.len() - 1) / 2;
                json!({
                    "crv": curve.name(),
                    "kty": "EC",
                    "x": b64(&point[1..1 + half]),
                    "y": b64(&point[1 + half..]),
                })
            }
        }
    }

    /// RFC 7638 JWK thumbprint (SHA-256, base64url). serde_json sorts keys, as the RFC requires.
    pub fn thumbprint(&self) -> String {
        thumbprint_of(&self.thumbprint_members())
    }

    /// Signs `message` with the key's algorithm; the result is the raw JWS signature.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match &self.inner {
            Inner::Rsa(k) => {
                let padding: &'static dyn signature::RsaEncoding = match self.alg {
                    Algorithm::RS256 => &signature::RSA_PKCS1_SHA256,
                    Algorithm::RS512 => &signature::RSA_PKCS1_SHA512,
                    _ => &signature::RSA_PKCS1_SHA384,
                };
                let mut sig = vec![0; k.public_modulus_len()];
                // Signing with a validated key pair and a correctly sized buffer cannot fail.
                k.sign(padding, &rng, message, &mut sig)
                    .expect("RSA signing with a valid key");
                sig
            }
            Inner::Ec(k, _) => k
                .sign(&rng, message)
                .expect("ECDSA signing with a valid key")
                .as_ref()
                .to_vec(),
        }
    }
}

/// The crypto library refuses RSA keys under 2048 bits with "TooSmall"; say so plainly.
fn rsa_error(e: aws_lc_rs::error::KeyRejected, path: &Path, kind: &'static str) -> KeyError {
    if e.description_() == "TooSmall" {
        KeyError::RsaTooShort {
            path: path.to_owned(),
        }
    } else {
        KeyError::Invalid {
            path: path.to_owned(),
            kind,
        }
    }
}

fn parse_ec(der: &[u8]) -> Option<Inner> {
    // The EC key pair type needs the algorithm to parse, so try each curve we support.
    if let Ok(k) =
        EcdsaKeyPair::from_private_key_der(&signature::ECDSA_P384_SHA384_FIXED_SIGNING, der)
    {
        return Some(Inner::Ec(k, Curve::P384));
    }
    EcdsaKeyPair::from_private_key_der(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, der)
        .ok()
        .map(|k| Inner::Ec(k, Curve::P256))
}

/// RFC 7638 thumbprint of a JWK's required members (given as a JSON object; serde_json sorts keys and
/// writes no whitespace, which is the RFC's canonical form).
pub fn thumbprint_of(members: &Value) -> String {
    let canonical = members.to_string();
    b64(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, canonical.as_bytes()).as_ref())
}

pub(crate) fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A JWKS document (`{"keys": [...]}`) for the given keys.
pub fn jwks(keys: &[SigningKey]) -> Value {
    json!({ "keys": keys.iter().map(SigningKey::public_jwk).collect::<Vec<_>>() })
}

/// Writes `dir/private.pem` (mode 0600, never overwriting) and `dir/jwks.json`.
pub fn write_key_pair(key: &SigningKey, dir: &Path) -> Result<(PathBuf, PathBuf), KeyError> {
    let werr = |path: &Path| {
        let path = path.to_owned();
        move |source| KeyError::Write { path, source }
    };
    crate::output::create_private_dir(dir).map_err(werr(dir))?;
    let private = dir.join("private.pem");
    let pem = key.to_pkcs8_pem()?;
    crate::output::write_new_private_file(&private, pem.as_bytes()).map_err(werr(&private))?;
    let public = dir.join("jwks.json");
    let text = format!("{:#}\n", jwks(std::slice::from_ref(key)));
    std::fs::write(&public, text).map_err(werr(&public))?;
    Ok((private, public))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc7638_example_thumbprint() {
        // RFC 7638 section 3.1.
        let members = json!({
            "e": "AQAB",
            "kty": "RSA",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
        });
        assert_eq!(
            thumbprint_of(&members),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
    }
}
