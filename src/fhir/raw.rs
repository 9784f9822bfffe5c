//! Editing a resource without re-encoding what is not edited: a JSON object read as its members in
//! order, each value kept as the server's text (`RawValue`). Numbers such as `1.50` keep their digits
//! (FHIR decimals carry precision), and member order is kept, so a resource with one field changed is
//! byte-equal to the server's everywhere else.

use std::fmt;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// A JSON object as its members, in order, with unparsed values.
#[derive(Debug, Default)]
pub struct RawObject(Vec<(String, Box<RawValue>)>);

impl RawObject {
    /// Reads `json` as an object; `None` if it is not one.
    pub fn parse(json: &str) -> Option<RawObject> {
        serde_json::from_str(json).ok()
    }

    /// The value of the first member named `key`.
    pub fn get(&self, key: &str) -> Option<&RawValue> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| &**v)
    }

    /// The value of `key` read as `T`; `None` when absent or of another shape.
    pub fn get_as<'a, T: Deserialize<'a>>(&'a self, key: &str) -> Option<T> {
        self.get(key)
            .and_then(|v| serde_json::from_str(v.get()).ok())
    }

    /// Replaces the value of `key` where it is, or appends the member.
    pub fn set(&mut self, key: &str, value: Box<RawValue>) {
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some(member) => member.1 = value,
            None => self.0.push((key.to_owned(), value)),
        }
    }

    /// Sets `key` to `value` serialised.
    pub fn set_value<T: Serialize>(&mut self, key: &str, value: &T) {
        self.set(key, to_raw(value));
    }

    /// The object as compact JSON text.
    pub fn to_raw(&self) -> Box<RawValue> {
        to_raw(self)
    }
}

/// `value` as JSON text. Serialising the plain data this module is given (strings, numbers, raw
/// values, maps with string keys) cannot fail.
pub fn to_raw<T: Serialize + ?Sized>(value: &T) -> Box<RawValue> {
    serde_json::value::to_raw_value(value).unwrap_or_else(|_| null())
}

fn null() -> Box<RawValue> {
    RawValue::from_string("null".to_owned()).unwrap_or_else(|_| unreachable!("null is JSON"))
}

impl<'de> Deserialize<'de> for RawObject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> Visitor<'de> for Members {
            type Value = RawObject;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawObject, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some((k, v)) = map.next_entry::<String, Box<RawValue>>()? {
                    members.push((k, v));
                }
                Ok(RawObject(members))
            }
        }
        d.deserialize_map(Members)
    }
}

impl Serialize for RawObject {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untouched_members_keep_their_text_and_order() {
        let text = r#"{"z":1.50,"a":{"b":[1,2.0]},"url":"Binary/1"}"#;
        let mut o = RawObject::parse(text).unwrap();
        assert_eq!(o.to_raw().get(), text);
        o.set_value("url", &"attachments/x.html");
        o.set_value("size", &12u64);
        assert_eq!(
            o.to_raw().get(),
            r#"{"z":1.50,"a":{"b":[1,2.0]},"url":"attachments/x.html","size":12}"#
        );
        assert_eq!(o.get_as::<u64>("size"), Some(12));
        assert_eq!(o.get_as::<String>("z"), None);
        assert!(RawObject::parse("[1]").is_none());
    }
}
