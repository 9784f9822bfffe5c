//! SMART Backend Services authentication: keys, the signed client assertion, token discovery and the
//! cached `TokenSource`. Nothing here knows about FHIR resources or output files.

pub mod assertion;
pub mod discovery;
pub mod jwks_check;
pub mod keys;
pub mod scope;
pub mod token;

pub use keys::{Algorithm, KeyError, SigningKey};
pub use token::{
    AccessToken, AuthError, Grant, TokenObserver, TokenRequestInfo, TokenSource, TokenSourceConfig,
};
