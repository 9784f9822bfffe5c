//! The layout of an export's key Secret and what may be read from it.
//!
//! The Secret named by `spec.auth.keySecretRef` holds the key that signs now under `key` (e.g.
//! `private.pem`) and, during a key rotation, two more PEM keys beside it: `next-<key>` (published,
//! not signing yet) and `retiring-<key>` (no longer signing, still published until it is safe to
//! drop). Export Jobs always mount `key`, so switching the signing key is one atomic Secret update.
//!
//! Everything here is pure: private keys are parsed only to derive their public half and key id, and
//! are dropped before a function returns. The rotation steps (`add_next`, `switch`, `retire`) are
//! edits of the Secret's data map that `controller::apply` writes with optimistic concurrency.

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use serde_json::{Value, json};

use crate::auth::keys::{Algorithm, SigningKey};
use crate::operator::crd::{PublicJwk, PublicKeys};

/// The data key of the next key beside the signing key `key`.
pub fn next_slot(key: &str) -> String {
    format!("next-{key}")
}

/// The data key of the retiring key beside the signing key `key`.
pub fn retiring_slot(key: &str) -> String {
    format!("retiring-{key}")
}

/// The public half of one key in the Secret.
#[derive(Clone, Debug, PartialEq)]
pub struct PublicKey {
    pub kid: String,
    /// The public JWK (`kty`, key members, `kid`, `alg`, `use: sig`); never a private member.
    pub jwk: Value,
}

/// The public keys of a key Secret, by rotation slot.
#[derive(Clone, Debug, PartialEq)]
pub struct KeySet {
    /// The key export runs sign with.
    pub active: PublicKey,
    /// A key published ahead of becoming the signing key.
    pub next: Option<PublicKey>,
    /// The previous signing key, published until no run can still be using it.
    pub retiring: Option<PublicKey>,
}

impl KeySet {
    /// The public JWKs: the signing key first, then the next and the retiring key.
    pub fn keys(&self) -> impl Iterator<Item = &Value> {
        std::iter::once(&self.active)
            .chain(&self.next)
            .chain(&self.retiring)
            .map(|k| &k.jwk)
    }

    /// The JWK Set document.
    pub fn jwks(&self) -> Value {
        json!({ "keys": self.keys().collect::<Vec<_>>() })
    }

    /// The JWK Set as `status.publicKeys` holds it (what the JWK Set endpoint serves). Members other
    /// than the public ones have no field there, so none can slip through.
    pub fn public_keys(&self) -> PublicKeys {
        PublicKeys {
            keys: self
                .keys()
                .filter_map(|jwk| serde_json::from_value::<PublicJwk>(jwk.clone()).ok())
                .collect(),
        }
    }

    /// Whether a rotation is under way (a next or a retiring key is present).
    pub fn rotating(&self) -> bool {
        self.next.is_some() || self.retiring.is_some()
    }

    /// The key ids by slot, as the rotation state machine sees them.
    pub fn kids(&self) -> KeyKids {
        KeyKids {
            active: self.active.kid.clone(),
            next: self.next.as_ref().map(|k| k.kid.clone()),
            retiring: self.retiring.as_ref().map(|k| k.kid.clone()),
        }
    }
}

/// The key ids of a key Secret's slots.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyKids {
    pub active: String,
    pub next: Option<String>,
    pub retiring: Option<String>,
}

/// Why a key Secret cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeySetError {
    /// The signing key's data key is absent; `keys` are the data keys present (names only).
    #[error("no key {key:?}")]
    Missing { key: String, keys: Vec<String> },
    /// A slot holds something that is not a usable private key.
    #[error("{slot:?} is not a usable private key: {reason}")]
    Invalid { slot: String, reason: String },
}

/// How the export signs: the configured algorithm and key id, if any.
#[derive(Clone, Debug, Default)]
pub struct Signing {
    pub algorithm: Option<Algorithm>,
    /// `spec.auth.keyId`: the `kid` of the signing key (the others keep their thumbprints).
    pub key_id: Option<String>,
}

/// Reads the public keys of `secret`'s slots around the signing key `key`.
pub fn read(secret: &Secret, key: &str, signing: &Signing) -> Result<KeySet, KeySetError> {
    let data = data_of(secret);
    let Some(active) = data.get(key) else {
        return Err(KeySetError::Missing {
            key: key.to_owned(),
            keys: data.keys().cloned().collect(),
        });
    };
    let active = public_key(key, active, signing.algorithm, signing.key_id.clone())?;
    let other = |slot: String| -> Result<Option<PublicKey>, KeySetError> {
        match data.get(&slot) {
            None => Ok(None),
            Some(pem) => public_key(&slot, pem, signing.algorithm, None).map(Some),
        }
    };
    Ok(KeySet {
        active,
        next: other(next_slot(key))?,
        retiring: other(retiring_slot(key))?,
    })
}

/// The Secret's data as bytes (`stringData` is write-only and normally absent on reads).
fn data_of(secret: &Secret) -> BTreeMap<String, Vec<u8>> {
    let mut data: BTreeMap<String, Vec<u8>> = secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    for (k, v) in secret.string_data.iter().flatten() {
        data.entry(k.clone())
            .or_insert_with(|| v.clone().into_bytes());
    }
    data
}

fn public_key(
    slot: &str,
    pem: &[u8],
    algorithm: Option<Algorithm>,
    kid: Option<String>,
) -> Result<PublicKey, KeySetError> {
    let path = Path::new(slot);
    // The configured algorithm may not fit a key of another type (an EC next key for an RSA
    // export): that key then carries its own default algorithm.
    let key = SigningKey::from_pem(pem, path, algorithm, kid.clone())
        .or_else(|first| match algorithm {
            Some(_) => SigningKey::from_pem(pem, path, None, kid).map_err(|_| first),
            None => Err(first),
        })
        .map_err(|e| KeySetError::Invalid {
            slot: slot.to_owned(),
            reason: without_path(&e.to_string(), slot),
        })?;
    Ok(PublicKey {
        kid: key.kid().to_owned(),
        jwk: key.public_jwk(),
    })
}

/// Key errors start with "private key file <path>: "; here the path is a Secret data key.
fn without_path(message: &str, slot: &str) -> String {
    message
        .strip_prefix(&format!("private key file {slot}: "))
        .unwrap_or(message)
        .to_owned()
}

/// A rotation step, as an edit of the key Secret's data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyChange {
    /// Add a newly generated key as `next-<key>`.
    AddNext,
    /// `next-<key>` becomes `key`; the old `key` becomes `retiring-<key>`.
    Switch,
    /// Remove `retiring-<key>`.
    Retire,
}

/// Why a key Secret change cannot be made: the Secret is not in the state the change expects.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    #[error("{0:?} exists already")]
    Exists(String),
    #[error("{0:?} is still there")]
    StillThere(String),
    #[error("{0:?} is gone")]
    Gone(String),
    #[error("no key was generated")]
    NoNewKey,
}

/// Applies `change` to `data` (the Secret's `data` map). `new_key_pem` is the generated key for
/// `AddNext`. Fails, naming the slot, when the Secret is not in the state the change expects.
pub fn edit(
    data: &mut BTreeMap<String, ByteString>,
    key: &str,
    change: &KeyChange,
    new_key_pem: Option<String>,
) -> Result<(), EditError> {
    let (next, retiring) = (next_slot(key), retiring_slot(key));
    match change {
        KeyChange::AddNext => {
            if data.contains_key(&next) {
                return Err(EditError::Exists(next));
            }
            let pem = new_key_pem.ok_or(EditError::NoNewKey)?;
            data.insert(next, ByteString(pem.into_bytes()));
        }
        KeyChange::Switch => {
            if data.contains_key(&retiring) {
                return Err(EditError::StillThere(retiring));
            }
            let new = data.remove(&next).ok_or(EditError::Gone(next))?;
            let old = data
                .insert(key.to_owned(), new)
                .ok_or_else(|| EditError::Gone(key.to_owned()))?;
            data.insert(retiring, old);
        }
        KeyChange::Retire => {
            data.remove(&retiring).ok_or(EditError::Gone(retiring))?;
        }
    }
    Ok(())
}
