//! Which SMTP server certificates are trusted, and the TLS connection to the server.
//!
//! - Normally: the platform's trust roots plus the certificates in `caFile`, with the usual chain and
//!   host name checks (rustls' WebPKI verifier).
//! - A certificate in `caFile` that the server presents *itself* (byte-equal end-entity certificate)
//!   is accepted as pinned, whatever its CA flag and names. That is what a local bridge needs:
//!   ProtonMail Bridge makes its own self-signed certificate with `CA:true`, key usage certSign, naming
//!   only `0.0.0.0`, which the WebPKI rules reject as an end entity (`CaUsedAsEndEntity`) and for any
//!   host name. Pinning trusts exactly that certificate and nothing it could sign.
//! - `insecureSkipVerify` (loopback hosts only, refused by the config elsewhere) accepts any
//!   certificate.
//!
//! The handshake signatures are always checked, so a pinned certificate is only accepted from the
//! holder of its private key.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientConfig, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, Error, RootCertStore, SignatureScheme};

/// How the server's certificate is judged.
#[derive(Debug)]
pub struct SmtpVerifier {
    /// End-entity certificates accepted as they are (the certificates of `caFile`).
    pinned: Vec<CertificateDer<'static>>,
    /// Chain and name validation against the platform roots and `caFile`; `None` without any root.
    webpki: Option<Arc<WebPkiServerVerifier>>,
    /// `insecureSkipVerify`: any certificate (the handshake signature is still checked).
    accept_any: bool,
    provider: Arc<CryptoProvider>,
}

/// Why `caFile` gives no certificate.
#[derive(Debug, thiserror::Error)]
pub enum CaProblem {
    #[error("not PEM certificates ({0})")]
    NotPem(rustls::pki_types::pem::Error),
    #[error("holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    Empty,
}

/// The certificates of a PEM file or text (`caFile`), or why there are none.
pub fn parse_pem_certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, CaProblem> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(CaProblem::NotPem)?;
    if certs.is_empty() {
        return Err(CaProblem::Empty);
    }
    Ok(certs)
}

impl SmtpVerifier {
    /// `ca`: the certificates of `caFile` (trusted as roots and pinned as end entities).
    pub fn new(ca: Vec<CertificateDer<'static>>, accept_any: bool) -> SmtpVerifier {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        roots.add_parsable_certificates(ca.iter().cloned());
        let webpki = (!roots.is_empty())
            .then(|| {
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .ok()
            })
            .flatten();
        SmtpVerifier {
            pinned: ca,
            webpki,
            accept_any,
            provider,
        }
    }

    /// A rustls client configuration (aws-lc-rs, TLS 1.2 and 1.3) with this verifier.
    pub fn client_config(self) -> Result<Arc<ClientConfig>, rustls::Error> {
        let provider = self.provider.clone();
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(self))
            .with_no_client_auth();
        Ok(Arc::new(config))
    }
}

impl ServerCertVerifier for SmtpVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        if self.accept_any
            || self
                .pinned
                .iter()
                .any(|p| p.as_ref() == end_entity.as_ref())
        {
            return Ok(ServerCertVerified::assertion());
        }
        match &self.webpki {
            Some(v) => {
                v.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            }
            None => Err(Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
