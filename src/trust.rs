//! The checks at the trust boundary that more than one module needs: what a resource type name may
//! look like before it names a file, which hosts count as loopback, and when plain `http://` is
//! acceptable. Pure functions, no I/O. SECURITY.md describes the trust model they serve.

/// The longest FHIR resource type name accepted (the longest R4/R5 name is 35 characters).
pub const MAX_RESOURCE_TYPE_LEN: usize = 64;

/// Whether `s` can be a FHIR resource type name: `^[A-Z][A-Za-z0-9]{0,63}$`. Only such a name may
/// become part of a file name (`<Type>.ndjson`); anything a server sends is checked with this first.
pub fn is_resource_type(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_RESOURCE_TYPE_LEN
        && b[0].is_ascii_uppercase()
        && b.iter().all(u8::is_ascii_alphanumeric)
}

/// A server-supplied resource type for a message: the name itself when it is a valid one, otherwise
/// only its length (it may be anything, a path or patient data).
pub fn describe_type(s: &str) -> String {
    if is_resource_type(s) {
        s.to_owned()
    } else {
        format!("an invalid resource type name ({} bytes)", s.len())
    }
}

/// Whether `host` is a loopback name or address: `localhost` (and `*.localhost`), 127.0.0.0/8 and
/// `::1`, with or without the brackets of a URL's IPv6 host.
pub fn is_loopback_host(host: &str) -> bool {
    let h = host.trim();
    let h = h
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(h);
    let h = h.trim_end_matches('.');
    if h.eq_ignore_ascii_case("localhost")
        || h.len() > ".localhost".len()
            && h[h.len() - ".localhost".len()..].eq_ignore_ascii_case(".localhost")
    {
        return true;
    }
    h.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback() || ip.to_canonical().is_loopback())
}

/// The rule for URLs the tool sends credentials or PHI over: `https://`, or `http://` only to a
/// loopback host or when the config explicitly allows it (`fhir.allowInsecureHttp`). The error says
/// why and what to write instead; the caller names the field.
pub fn check_transport(url: &url::Url, allow_insecure_http: bool) -> Result<(), TransportRefused> {
    match url.scheme() {
        "https" => Ok(()),
        "http" if allow_insecure_http => Ok(()),
        "http" if url.host_str().is_some_and(is_loopback_host) => Ok(()),
        "http" => Err(TransportRefused::PlainHttp(url.to_string())),
        other => Err(TransportRefused::Scheme {
            url: url.to_string(),
            scheme: other.to_owned(),
        }),
    }
}

/// Why [`check_transport`] refuses a URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportRefused {
    #[error(
        "{0} uses plain http to a host that is not loopback: the access token and patient data \
         would cross the network unencrypted. Use https://, or set fhir.allowInsecureHttp: true \
         only for a test server on a private network"
    )]
    PlainHttp(String),
    #[error("{url}: the scheme {scheme}: is not http(s)")]
    Scheme { url: String, scheme: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_type_names() {
        for ok in ["Patient", "Observation", "A", "MedicationRequest", "X1"] {
            assert!(is_resource_type(ok), "{ok}");
        }
        let long = format!("A{}", "b".repeat(64));
        for bad in [
            "",
            "patient",
            "../../tmp/x",
            "Obs/../x",
            "Obs.ndjson",
            "Obs ervation",
            "Ωmega",
            "1Patient",
            long.as_str(),
        ] {
            assert!(!is_resource_type(bad), "{bad:?}");
        }
        assert!(is_resource_type(&long[..64]));
        assert_eq!(
            describe_type("../x"),
            "an invalid resource type name (4 bytes)"
        );
    }

    #[test]
    fn loopback_hosts() {
        for ok in [
            "127.0.0.1",
            "127.1.2.3",
            "localhost",
            "LOCALHOST",
            "api.localhost",
            "::1",
            "[::1]",
            "::ffff:127.0.0.1",
            "localhost.",
        ] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in [
            "smtp.example.org",
            "10.0.0.1",
            "0.0.0.0",
            "localhost.example.org",
            "[::2]",
            "",
        ] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
    }

    #[test]
    fn plain_http_only_where_safe() {
        let u = |s: &str| url::Url::parse(s).unwrap();
        assert!(check_transport(&u("https://fhir.example.org/R4"), false).is_ok());
        assert!(check_transport(&u("http://127.0.0.1:8080/R4"), false).is_ok());
        assert!(check_transport(&u("http://[::1]:8080/R4"), false).is_ok());
        assert!(check_transport(&u("http://localhost/R4"), false).is_ok());
        let e = check_transport(&u("http://fhir.example.org/R4"), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("allowInsecureHttp"), "{e}");
        assert!(check_transport(&u("http://fhir.example.org/R4"), true).is_ok());
        assert!(check_transport(&u("ftp://fhir.example.org/R4"), true).is_err());
    }
}
