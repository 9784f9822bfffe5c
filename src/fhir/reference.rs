//! FHIR references (`{"reference": "Medication/123"}`): finding every one in a resource without
//! building a JSON tree, and telling a reference to the exporting server (`Type/id`, or absolute
//! under its base) from a contained one (`#x`), a `urn:` or one to another server.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// A resource on the exporting server.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reference {
    pub resource_type: String,
    pub id: String,
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}/{}", self.resource_type, self.id)
    }
}

/// Whether `s` is a FHIR id: 1-64 letters, digits, `-` and `.`.
pub fn is_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// The resource `reference` names on the server at `base` (no trailing slash): `Type/id`,
/// `Type/id/_history/v`, or either under `base`. `None` for anything else (contained, `urn:`,
/// another server, malformed), which is left alone.
pub fn local(reference: &str, base: &str) -> Option<Reference> {
    let relative = match reference.strip_prefix(base) {
        Some(rest) => rest.strip_prefix('/')?,
        None if reference.contains(':') || reference.starts_with('#') => return None,
        None => reference,
    };
    let mut parts = relative.split('/');
    let (t, id) = (parts.next()?, parts.next()?);
    match (parts.next(), parts.next(), parts.next()) {
        (None, _, _) => {}
        (Some("_history"), Some(v), None) if !v.is_empty() => {}
        _ => return None,
    }
    (crate::trust::is_resource_type(t) && is_id(id)).then(|| Reference {
        resource_type: t.to_owned(),
        id: id.to_owned(),
    })
}

/// Calls `found` with the value of every `reference` member (a string) anywhere in `json`.
pub fn scan(json: &[u8], found: &mut dyn FnMut(&str)) -> Result<(), serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(json);
    Walk {
        found,
        is_reference: false,
    }
    .deserialize(&mut de)?;
    de.end()
}

/// Walks any JSON value; a string that is the value of a `reference` member is reported.
struct Walk<'f> {
    found: &'f mut dyn FnMut(&str),
    is_reference: bool,
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("JSON")
    }
    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        if self.is_reference {
            (self.found)(v);
        }
        Ok(())
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            map.next_value_seed(Walk {
                found: &mut *self.found,
                is_reference: key == "reference",
            })?;
        }
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(Walk {
                found: &mut *self.found,
                is_reference: false,
            })?
            .is_some()
        {}
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_every_reference_string() {
        let json = br##"{"resourceType":"MedicationRequest","medicationReference":{"reference":"Medication/m1"},
            "contained":[{"resourceType":"Medication","id":"x"}],"note":[{"text":"reference"}],
            "performer":[{"reference":"#x"},{"reference":5},{"reference":{"reference":"Location/l"}}],
            "subject":{"reference":"Patient/p","display":"P"}}"##;
        let mut found = Vec::new();
        scan(json, &mut |r| found.push(r.to_owned())).unwrap();
        assert_eq!(found, ["Medication/m1", "#x", "Location/l", "Patient/p"]);
        assert!(scan(b"{\"a\":", &mut |_| {}).is_err());
    }

    #[test]
    fn only_references_to_this_server_are_local() {
        let base = "https://fhir.example.org/api/FHIR/R4";
        let r = |t: &str, id: &str| {
            Some(Reference {
                resource_type: t.into(),
                id: id.into(),
            })
        };
        assert_eq!(local("Medication/m1", base), r("Medication", "m1"));
        assert_eq!(
            local("Practitioner/d.1/_history/3", base),
            r("Practitioner", "d.1")
        );
        assert_eq!(
            local(&format!("{base}/Location/l-2"), base),
            r("Location", "l-2")
        );
        for other in [
            "#med1",
            "urn:uuid:0f1e",
            "https://other.example.org/fhir/Medication/zz",
            "https://fhir.example.org/api/FHIR/R4X/Medication/m",
            "Medication",
            "Medication/",
            "Medication/a/b",
            "../Medication/x",
            "medication/x",
            "Medication/x y",
        ] {
            assert_eq!(local(other, base), None, "{other}");
        }
    }
}
