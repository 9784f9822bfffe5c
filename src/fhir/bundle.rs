//! Search-set bundles, passed through as JSON text: entries are split into resources and outcome entries,
//! each resource compacted to one line with its content unchanged, and the `next` link returned verbatim.

use crate::http::body::json_error_kind;
use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

#[derive(Deserialize)]
struct Bundle<'a> {
    #[serde(rename = "resourceType", borrow)]
    resource_type: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    entry: Vec<Entry<'a>>,
    #[serde(default)]
    link: Vec<Link>,
}

#[derive(Deserialize)]
struct Entry<'a> {
    #[serde(borrow)]
    resource: Option<&'a RawValue>,
    search: Option<EntrySearch>,
}

#[derive(Deserialize)]
struct EntrySearch {
    mode: Option<String>,
}

#[derive(Deserialize)]
struct Link {
    relation: String,
    url: String,
}

/// The parts of a resource we look at.
#[derive(Deserialize)]
pub struct ResourceHead<'a> {
    #[serde(rename = "resourceType", borrow)]
    pub resource_type: Cow<'a, str>,
    #[serde(borrow)]
    pub id: Option<Cow<'a, str>>,
}

/// One page of a search.
pub struct Page<'a> {
    pub resources: Vec<&'a RawValue>,
    /// Entries with `search.mode = outcome`, and OperationOutcome resources in the entries.
    pub outcomes: Vec<&'a RawValue>,
    pub next: Option<String>,
}

/// Why a search answer is not a search-set page (never quoting its content).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PageError {
    #[error("the response is not a FHIR Bundle ({0})")]
    NotJson(&'static str),
    #[error("expected a Bundle, got a {0}")]
    NotBundle(String),
    #[error("the response has no resourceType")]
    NoResourceType,
}

/// Parses a search-set page. The error says what is wrong without quoting content.
pub fn parse_page(body: &[u8]) -> Result<Page<'_>, PageError> {
    let bundle: Bundle<'_> =
        serde_json::from_slice(body).map_err(|e| PageError::NotJson(json_error_kind(&e)))?;
    match bundle.resource_type.as_deref() {
        Some("Bundle") => {}
        Some(other) => {
            return Err(PageError::NotBundle(crate::trust::describe_type(other)));
        }
        None => return Err(PageError::NoResourceType),
    }
    let mut page = Page {
        resources: Vec::with_capacity(bundle.entry.len()),
        outcomes: Vec::new(),
        next: None,
    };
    for e in bundle.entry {
        let Some(resource) = e.resource else { continue };
        let is_outcome = e
            .search
            .and_then(|s| s.mode)
            .is_some_and(|m| m == "outcome")
            || head(resource).is_ok_and(|h| h.resource_type == "OperationOutcome");
        if is_outcome {
            page.outcomes.push(resource)
        } else {
            page.resources.push(resource)
        }
    }
    page.next = bundle
        .link
        .into_iter()
        .find(|l| l.relation == "next")
        .map(|l| l.url)
        .filter(|u| !u.is_empty());
    Ok(page)
}

pub fn head(resource: &RawValue) -> Result<ResourceHead<'_>, serde_json::Error> {
    serde_json::from_str(resource.get())
}

/// Appends `json` to `out` without insignificant whitespace, then a newline. Strings are copied byte
/// for byte, so the content is unchanged.
pub fn push_compact_line(json: &[u8], out: &mut Vec<u8>) {
    out.reserve(json.len() + 1);
    let mut in_string = false;
    let mut escaped = false;
    for &b in json {
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if !matches!(b, b' ' | b'\n' | b'\r' | b'\t') {
            if b == b'"' {
                in_string = true;
            }
            out.push(b);
        }
    }
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compacts_without_touching_strings() {
        let mut out = Vec::new();
        push_compact_line(
            b"{ \"a\" : \"x y\\\" \\\\\",\n  \"b\": [1, 2]\r\n}",
            &mut out,
        );
        assert_eq!(out, b"{\"a\":\"x y\\\" \\\\\",\"b\":[1,2]}\n");
    }

    #[test]
    fn splits_outcomes_and_next() {
        let body = br#"{"resourceType":"Bundle","type":"searchset","link":[{"relation":"self","url":"s"},{"relation":"next","url":"https://h/n?x=1"}],
          "entry":[{"resource":{"resourceType":"Condition","id":"c1"},"search":{"mode":"match"}},
                   {"resource":{"resourceType":"OperationOutcome","issue":[]},"search":{"mode":"outcome"}}]}"#;
        let p = parse_page(body).unwrap();
        assert_eq!(p.resources.len(), 1);
        assert_eq!(p.outcomes.len(), 1);
        assert_eq!(p.next.as_deref(), Some("https://h/n?x=1"));
        assert_eq!(head(p.resources[0]).unwrap().id.as_deref(), Some("c1"));
        assert!(parse_page(br#"{"resourceType":"OperationOutcome"}"#).is_err());
        assert!(parse_page(br#"{"resourceType":"Bundle","entry":[{"resource":{"#).is_err());
    }
}
