//! Which container images export Jobs may run.
//!
//! An export Job's pod mounts the export's key Secret, so the image it runs is trusted with the key.
//! By default only the operator's own job image is allowed (`--image`); the operator's administrator
//! may allow more with `--allowed-job-images` (the chart's `allowedJobImages`), and an EpicExport whose
//! `spec.job.image` names anything else is `Stalled`. This module only decides; it does no I/O.
//!
//! A rule is either an exact image reference (`registry.example.org/epic-export:1.2.0`,
//! `registry.example.org/epic-export@sha256:<digest>`) or a prefix ending in `*`:
//! `registry.example.org/epic-export@sha256:*` allows every digest of that repository, and
//! `registry.example.org/epic-export:*` every tag. The `*` only stands at the end, and it matches any
//! text, so end the prefix with `@sha256:`, `:` or `/` (a bare `…/epic-export*` would also allow
//! `…/epic-export-other`).

/// One allow-list entry.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Rule {
    Exact(String),
    Prefix(String),
}

/// The images export Jobs may run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImagePolicy {
    /// The operator's own job image, always allowed (the default of `spec.job.image`).
    default: String,
    rules: Vec<Rule>,
}

/// An allow-list entry that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "--allowed-job-images entry {entry:?}: {why}; write an image reference (registry/repository:tag or @sha256:digest) or a prefix ending in `*`, e.g. registry.example.org/epic-export@sha256:*"
)]
pub struct RuleError {
    entry: String,
    why: &'static str,
}

impl ImagePolicy {
    /// Only the operator's own job image.
    pub fn only(default: &str) -> ImagePolicy {
        ImagePolicy {
            default: default.to_owned(),
            rules: Vec::new(),
        }
    }

    /// The operator's job image and the `allowed` entries (empty entries, e.g. from a trailing
    /// comma, are skipped).
    pub fn new(default: &str, allowed: &[String]) -> Result<ImagePolicy, RuleError> {
        let mut policy = ImagePolicy::only(default);
        for entry in allowed.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            let bad = |why| RuleError {
                entry: entry.to_owned(),
                why,
            };
            if entry.chars().any(char::is_whitespace) {
                return Err(bad("an image reference has no spaces"));
            }
            let rule = match entry.strip_suffix('*') {
                Some(prefix) if prefix.contains('*') => {
                    return Err(bad("`*` may only end the entry"));
                }
                Some("") => return Err(bad("`*` alone would allow every image")),
                Some(prefix) => Rule::Prefix(prefix.to_owned()),
                None if entry.contains('*') => return Err(bad("`*` may only end the entry")),
                None => Rule::Exact(entry.to_owned()),
            };
            policy.rules.push(rule);
        }
        Ok(policy)
    }

    /// The image a Job runs when the spec names none.
    pub fn default_image(&self) -> &str {
        &self.default
    }

    /// Whether export Jobs may run `image`.
    pub fn allows(&self, image: &str) -> bool {
        image == self.default
            || self.rules.iter().any(|r| match r {
                Rule::Exact(e) => image == e,
                Rule::Prefix(p) => image.starts_with(p.as_str()) && image.len() > p.len(),
            })
    }

    /// The rules as written, for messages.
    pub fn describe(&self) -> String {
        let mut all = vec![self.default.clone()];
        all.extend(self.rules.iter().map(|r| match r {
            Rule::Exact(e) => e.clone(),
            Rule::Prefix(p) => format!("{p}*"),
        }));
        all.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWN: &str = "registry.example.org/epic-export:1.0";

    fn policy(rules: &[&str]) -> ImagePolicy {
        let rules: Vec<String> = rules.iter().map(|s| s.to_string()).collect();
        ImagePolicy::new(OWN, &rules).unwrap()
    }

    #[test]
    fn only_the_own_image_by_default() {
        let p = ImagePolicy::only(OWN);
        assert!(p.allows(OWN));
        assert!(!p.allows("registry.example.org/epic-export:1.1"));
        assert!(!p.allows("evil.example/epic-export:1.0"));
        assert!(!p.allows(""));
    }

    #[test]
    fn exact_and_prefix_rules() {
        let digest = format!("registry.example.org/epic-export@sha256:{}", "a".repeat(64));
        let p = policy(&[
            "registry.example.org/epic-export@sha256:*",
            "mirror.example.org/tools/epic-export:2.0",
            "",
        ]);
        assert!(p.allows(OWN));
        assert!(p.allows(&digest));
        assert!(p.allows("mirror.example.org/tools/epic-export:2.0"));
        assert!(!p.allows("mirror.example.org/tools/epic-export:2.0-debug"));
        assert!(!p.allows("registry.example.org/epic-export@sha256:"));
        assert!(!p.allows("registry.example.org/epic-export:latest"));
        assert!(!p.allows("registry.example.org/epic-export-other@sha256:abc"));
        assert_eq!(
            p.describe(),
            "registry.example.org/epic-export:1.0, registry.example.org/epic-export@sha256:*, mirror.example.org/tools/epic-export:2.0"
        );
    }

    #[test]
    fn unusable_rules_are_refused() {
        for bad in ["*", "registry.example.org/*/epic-export:*", "a*b", "x y"] {
            let e = ImagePolicy::new(OWN, &[bad.to_string()]).unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
    }
}
