//! Where a resource keeps its attachments and how one is changed in place: the path of fields
//! from `plan::ATTACHMENT_RESOURCES` (e.g. `content[].attachment`) walked over the resource's text,
//! each attachment handed to a visitor as a `RawObject`, and only what the visitor changed
//! re-encoded. Everything else stays the server's bytes.

use serde_json::value::RawValue;

use crate::fhir::raw::{RawObject, to_raw};

/// One step of an attachment path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// A member of an object.
    Field(String),
    /// Every element of an array.
    Each,
}

/// Reads a path such as `content[].attachment`.
pub fn parse_path(path: &str) -> Vec<Step> {
    let mut steps = Vec::new();
    for part in path.split('.') {
        match part.strip_suffix("[]") {
            Some(field) => {
                steps.push(Step::Field(field.to_owned()));
                steps.push(Step::Each);
            }
            None => steps.push(Step::Field(part.to_owned())),
        }
    }
    steps
}

/// The attachment path of `resource_type`, if it is one whose attachments are known.
pub fn path_of(resource_type: &str) -> Option<Vec<Step>> {
    crate::plan::ATTACHMENT_RESOURCES
        .iter()
        .find(|(t, _)| *t == resource_type)
        .map(|(_, p)| parse_path(p))
}

/// The fields of an attachment that decide what happens to it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AttachmentView {
    pub url: Option<String>,
    pub content_type: Option<String>,
    /// `size` as declared (a number in R4, a string in R5).
    pub size: Option<u64>,
    /// `hash` as declared: base64 of the SHA-1.
    pub hash: Option<String>,
    /// Whether the content is inline already (`data`).
    pub has_data: bool,
}

impl AttachmentView {
    pub fn of(a: &RawObject) -> AttachmentView {
        AttachmentView {
            url: a.get_as::<String>("url"),
            content_type: a.get_as::<String>("contentType"),
            size: a
                .get_as::<u64>("size")
                .or_else(|| a.get_as::<String>("size").and_then(|s| s.parse().ok())),
            hash: a.get_as::<String>("hash"),
            has_data: a.get("data").is_some(),
        }
    }
}

/// Every attachment of `resource` along `path`, in document order. Parts that do not have the
/// expected shape (a lying or careless server) are passed over.
pub fn find(resource: &str, path: &[Step]) -> Vec<AttachmentView> {
    let mut found = Vec::new();
    if let Ok(raw) = serde_json::from_str::<&RawValue>(resource) {
        walk(raw, path, &mut |a| {
            found.push(AttachmentView::of(a));
            false
        });
    }
    found
}

/// Visits every attachment of `resource` along `path`, in the order of [`find`]; `visit` returns
/// whether it changed the attachment. Returns the resource with the changes, `None` if there were
/// none.
pub fn rewrite(
    resource: &str,
    path: &[Step],
    visit: &mut dyn FnMut(&mut RawObject) -> bool,
) -> Option<Box<RawValue>> {
    let raw = serde_json::from_str::<&RawValue>(resource).ok()?;
    walk(raw, path, visit)
}

fn walk(
    raw: &RawValue,
    path: &[Step],
    visit: &mut dyn FnMut(&mut RawObject) -> bool,
) -> Option<Box<RawValue>> {
    match path.split_first() {
        None => {
            let mut a = RawObject::parse(raw.get())?;
            visit(&mut a).then(|| a.to_raw())
        }
        Some((Step::Field(name), rest)) => {
            let mut o = RawObject::parse(raw.get())?;
            let changed = walk(o.get(name)?, rest, visit)?;
            o.set(name, changed);
            Some(o.to_raw())
        }
        Some((Step::Each, rest)) => {
            let mut items: Vec<Box<RawValue>> = serde_json::from_str(raw.get()).ok()?;
            let mut changed = false;
            for item in &mut items {
                if let Some(new) = walk(item, rest, visit) {
                    *item = new;
                    changed = true;
                }
            }
            changed.then(|| to_raw(&items))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r#"{"resourceType":"DocumentReference","id":"d1","content":[{"attachment":{"contentType":"text/html","url":"Binary/b1"},"format":{"code":"x"}},{"attachment":{"contentType":"text/rtf","url":"Binary/b1","size":"12"}},{"format":{}}],"value":1.50}"#;

    #[test]
    fn finds_and_rewrites_along_the_path() {
        let path = path_of("DocumentReference").unwrap();
        let found = find(DOC, &path);
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].url.as_deref(), Some("Binary/b1"));
        assert_eq!(found[1].content_type.as_deref(), Some("text/rtf"));
        assert_eq!(found[1].size, Some(12));
        let mut n = 0;
        let out = rewrite(DOC, &path, &mut |a| {
            n += 1;
            if n == 2 {
                a.set_value("url", &"attachments/x.rtf");
            }
            n == 2
        })
        .unwrap();
        assert_eq!(
            out.get(),
            DOC.replace(
                r#""url":"Binary/b1","size""#,
                r#""url":"attachments/x.rtf","size""#
            )
        );
        assert!(rewrite(DOC, &path, &mut |_| false).is_none());
    }

    #[test]
    fn presented_form_and_wrong_shapes() {
        let path = path_of("DiagnosticReport").unwrap();
        assert_eq!(path, [Step::Field("presentedForm".into()), Step::Each]);
        let report = r#"{"resourceType":"DiagnosticReport","presentedForm":[{"url":"Binary/p","contentType":"application/pdf"},7,"x"]}"#;
        assert_eq!(find(report, &path).len(), 1);
        assert!(find(r#"{"presentedForm":{"url":"x"}}"#, &path).is_empty());
        assert!(find("not json", &path).is_empty());
    }
}
