//! SMART scopes as granted in a token answer: whether a scope string lets a backend service read a
//! resource type (`system/Binary.read`, `system/*.read`, SMART v2's `system/Binary.rs`, wildcards).

/// Whether `granted` (space-separated scopes) allows reading `resource_type` as a backend service.
pub fn grants_read(granted: &str, resource_type: &str) -> bool {
    granted.split_whitespace().any(|scope| {
        let Some(rest) = scope.strip_prefix("system/") else {
            return false;
        };
        let Some((t, access)) = rest.split_once('.') else {
            return false;
        };
        // SMART v2 permissions may carry a query (`system/Observation.rs?category=...`): that is a
        // narrower grant, not a grant of the whole type.
        (t == resource_type || t == "*")
            && match access {
                "read" | "*" => true,
                v2 => {
                    !v2.is_empty() && v2.bytes().all(|b| b"cruds".contains(&b)) && v2.contains('r')
                }
            }
    })
}

/// The types of `wanted` that `granted` does not let the client read.
pub fn missing_reads<'a>(granted: &str, wanted: &[&'a str]) -> Vec<&'a str> {
    wanted
        .iter()
        .copied()
        .filter(|t| !grants_read(granted, t))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_grants() {
        assert!(grants_read(
            "system/Patient.read system/Binary.read",
            "Binary"
        ));
        assert!(grants_read("system/*.read", "Medication"));
        assert!(grants_read("system/Binary.rs", "Binary"));
        assert!(grants_read("system/*.cruds", "Location"));
        assert!(grants_read("system/Binary.*", "Binary"));
        assert!(!grants_read("system/Binary.write", "Binary"));
        assert!(!grants_read("system/Binary.c", "Binary"));
        assert!(!grants_read("patient/Binary.read user/*.read", "Binary"));
        assert!(!grants_read(
            "system/Observation.rs?category=laboratory",
            "Observation"
        ));
        assert!(!grants_read("", "Binary"));
        assert_eq!(
            missing_reads("system/Binary.read", &["Binary", "Medication"]),
            ["Medication"]
        );
    }
}
