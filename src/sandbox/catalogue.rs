//! The resources all sandbox patients share: Medications, Practitioners, PractitionerRoles,
//! Organizations and Locations.
//!
//! Like the patient data, the catalogue is never stored: a resource is rebuilt from
//! `(seed, type, ordinal)` (ids and `meta.lastUpdated` from the seed, names and codes from the
//! fixed tables below). It is small and fixed: one Medication per [`MEDICATIONS`] entry, 12
//! Practitioners each with one PractitionerRole, a parent Organization with three departments
//! (`partOf` the parent), and six Locations managed by the departments. Patient resources
//! reference these (see `data.rs`); they are not in the patient compartment, so they are only
//! reachable by read or `_id` search, never by a per-patient search or a bulk export, as on Epic.

use serde_json::{Value, json};

use super::rng::{SHARED, fhir_id, rng_for};

/// The shared resource types, readable by id and searchable by `_id`.
pub const CATALOGUE_TYPES: &[&str] = &[
    "Medication",
    "Practitioner",
    "PractitionerRole",
    "Organization",
    "Location",
];

pub(super) const RXNORM: &str = "http://www.nlm.nih.gov/research/umls/rxnorm";
const NPI: &str = "http://hl7.org/fhir/sid/us-npi";
const NUCC: &str = "http://nucc.org/provider-taxonomy";
const ROLE_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-RoleCode";
const PROVIDER_ROLE: &str = "http://terminology.hl7.org/CodeSystem/practitioner-role";
const ORG_TYPE: &str = "http://terminology.hl7.org/CodeSystem/organization-type";
/// Epic-style internal identifier systems (the OID shapes Epic uses; the numbers are made up).
const EPIC_MED_ID: &str = "urn:oid:1.2.840.114350.1.13.0.1.7.2.698288";
const EPIC_SER_ID: &str = "urn:oid:1.2.840.114350.1.13.0.1.7.5.737384.65";
const EPIC_DEP_ID: &str = "urn:oid:1.2.840.114350.1.13.0.1.7.2.686980";

/// (RxNorm code, display, form) — one Medication each.
pub(super) const MEDICATIONS: &[(&str, &str, &str)] = &[
    ("197361", "amlodipine 5 MG Oral Tablet", "Tablet"),
    (
        "860975",
        "24 HR metformin hydrochloride 500 MG Extended Release Oral Tablet",
        "Tablet, Extended Release",
    ),
    ("314076", "lisinopril 10 MG Oral Tablet", "Tablet"),
    ("617312", "atorvastatin 10 MG Oral Tablet", "Tablet"),
    (
        "745679",
        "200 ACTUAT albuterol 0.09 MG/ACTUAT Metered Dose Inhaler",
        "Aerosol, Metered Dose Inhaler",
    ),
    ("310965", "ibuprofen 200 MG Oral Tablet", "Tablet"),
];

/// The parent Organization (no `partOf`).
const HEALTH_SYSTEM: usize = 0;
/// Departments: Organizations `partOf` the health system.
pub(super) const DEPT_PRIMARY_CARE: usize = 1;
pub(super) const DEPT_EMERGENCY: usize = 2;
pub(super) const DEPT_LABORATORY: usize = 3;

/// (name, type code, type display) by Organization ordinal.
const ORGANIZATIONS: &[(&str, &str, &str)] = &[
    ("Lakeview Health", "prov", "Healthcare Provider"),
    ("Lakeview Family Medicine", "dept", "Hospital Department"),
    (
        "Lakeview Emergency Department",
        "dept",
        "Hospital Department",
    ),
    (
        "Lakeview Clinical Laboratory",
        "dept",
        "Hospital Department",
    ),
];

/// (name, managing department, RoleCode, RoleCode display, city, street)
const LOCATIONS: &[(&str, usize, &str, &str, &str, &str)] = &[
    (
        "Lakeview Family Medicine Verona",
        DEPT_PRIMARY_CARE,
        "PC",
        "primary care clinic",
        "Verona",
        "120 Enterprise Drive",
    ),
    (
        "Lakeview Family Medicine East Madison",
        DEPT_PRIMARY_CARE,
        "PC",
        "primary care clinic",
        "Madison",
        "4820 Cottage Grove Road",
    ),
    (
        "Lakeview Internal Medicine Clinic",
        DEPT_PRIMARY_CARE,
        "GIM",
        "general internal medicine clinic",
        "Madison",
        "1 Lakeview Plaza",
    ),
    (
        "Lakeview Main Campus Emergency Department",
        DEPT_EMERGENCY,
        "ER",
        "Emergency room",
        "Madison",
        "1 Lakeview Plaza",
    ),
    (
        "Lakeview Fitchburg Urgent Care",
        DEPT_EMERGENCY,
        "ER",
        "Emergency room",
        "Fitchburg",
        "2970 Cahill Main",
    ),
    (
        "Lakeview Main Campus Laboratory",
        DEPT_LABORATORY,
        "HLAB",
        "hospital laboratory",
        "Madison",
        "1 Lakeview Plaza",
    ),
];

/// (given, family, credential, gender, department, NUCC taxonomy code, specialty, role code)
type PractitionerRow = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    usize,
    &'static str,
    &'static str,
    &'static str,
);

const PRACTITIONERS: &[PractitionerRow] = &[
    (
        "Amy",
        "Chen",
        "MD",
        "female",
        DEPT_PRIMARY_CARE,
        "207Q00000X",
        "Family Medicine",
        "doctor",
    ),
    (
        "Robert",
        "Okonkwo",
        "MD",
        "male",
        DEPT_PRIMARY_CARE,
        "207R00000X",
        "Internal Medicine",
        "doctor",
    ),
    (
        "Priya",
        "Raman",
        "DO",
        "female",
        DEPT_PRIMARY_CARE,
        "207Q00000X",
        "Family Medicine",
        "doctor",
    ),
    (
        "Jonas",
        "Lindqvist",
        "MD",
        "male",
        DEPT_PRIMARY_CARE,
        "207RC0000X",
        "Cardiovascular Disease",
        "doctor",
    ),
    (
        "Maria",
        "Delgado",
        "NP",
        "female",
        DEPT_PRIMARY_CARE,
        "363LF0000X",
        "Nurse Practitioner, Family",
        "nurse",
    ),
    (
        "Samuel",
        "Brooks",
        "PA-C",
        "male",
        DEPT_PRIMARY_CARE,
        "363A00000X",
        "Physician Assistant",
        "doctor",
    ),
    (
        "Hiroshi",
        "Tanaka",
        "MD",
        "male",
        DEPT_PRIMARY_CARE,
        "207R00000X",
        "Internal Medicine",
        "doctor",
    ),
    (
        "Elena",
        "Petrova",
        "MD",
        "female",
        DEPT_EMERGENCY,
        "207P00000X",
        "Emergency Medicine",
        "doctor",
    ),
    (
        "Marcus",
        "Hale",
        "MD",
        "male",
        DEPT_EMERGENCY,
        "207P00000X",
        "Emergency Medicine",
        "doctor",
    ),
    (
        "Fatima",
        "Haddad",
        "DO",
        "female",
        DEPT_EMERGENCY,
        "207P00000X",
        "Emergency Medicine",
        "doctor",
    ),
    (
        "Grace",
        "Whitfield",
        "MD",
        "female",
        DEPT_LABORATORY,
        "207ZP0102X",
        "Clinical Pathology",
        "doctor",
    ),
    (
        "Daniel",
        "Novak",
        "MD",
        "male",
        DEPT_LABORATORY,
        "207ZP0102X",
        "Clinical Pathology",
        "doctor",
    ),
];

/// How many resources of a catalogue type there are (0 for other types).
pub(super) fn count(resource_type: &str) -> usize {
    match resource_type {
        "Medication" => MEDICATIONS.len(),
        "Practitioner" | "PractitionerRole" => PRACTITIONERS.len(),
        "Organization" => ORGANIZATIONS.len(),
        "Location" => LOCATIONS.len(),
        _ => 0,
    }
}

fn tag(resource_type: &str) -> u64 {
    400 + CATALOGUE_TYPES
        .iter()
        .position(|t| *t == resource_type)
        .unwrap_or(99) as u64
}

/// The id of the `n`-th resource of a catalogue type.
pub(super) fn id(seed: u64, resource_type: &str, n: usize) -> String {
    fhir_id(seed, SHARED, tag(resource_type), n as u64)
}

/// `{"reference": "Type/id", "display": ...}` for the `n`-th resource of a catalogue type.
pub(super) fn reference(seed: u64, resource_type: &str, n: usize) -> Value {
    let mut r = json!({"reference": format!("{resource_type}/{}", id(seed, resource_type, n))});
    if let Some(display) = display(resource_type, n) {
        r["display"] = json!(display);
    }
    r
}

/// The human-readable name used as a reference's `display`.
fn display(resource_type: &str, n: usize) -> Option<String> {
    match resource_type {
        "Medication" => MEDICATIONS.get(n).map(|m| m.1.to_string()),
        "Practitioner" | "PractitionerRole" => PRACTITIONERS.get(n).map(practitioner_name),
        "Organization" => ORGANIZATIONS.get(n).map(|o| o.0.to_string()),
        "Location" => LOCATIONS.get(n).map(|l| l.0.to_string()),
        _ => None,
    }
}

fn practitioner_name(p: &PractitionerRow) -> String {
    format!("{} {}, {}", p.0, p.1, p.2)
}

/// The display name of Practitioner `n` (e.g. `Amy Chen, MD`).
pub(super) fn practitioner_display(n: usize) -> String {
    PRACTITIONERS
        .get(n)
        .map(practitioner_name)
        .unwrap_or_default()
}

/// The department (Organization ordinal) a Practitioner works in.
pub(super) fn practitioner_department(n: usize) -> usize {
    PRACTITIONERS.get(n).map_or(DEPT_PRIMARY_CARE, |p| p.4)
}

/// The display name of Organization `n`.
pub(super) fn organization_display(n: usize) -> String {
    display("Organization", n).unwrap_or_default()
}

/// Practitioner ordinals of one department.
pub(super) fn practitioners_in(department: usize) -> Vec<usize> {
    (0..PRACTITIONERS.len())
        .filter(|n| PRACTITIONERS[*n].4 == department)
        .collect()
}

/// Location ordinals managed by one department.
pub(super) fn locations_in(department: usize) -> Vec<usize> {
    (0..LOCATIONS.len())
        .filter(|n| LOCATIONS[*n].1 == department)
        .collect()
}

/// The `n`-th resource of a catalogue type, or `None` beyond [`count`].
pub(super) fn resource(seed: u64, resource_type: &str, n: usize) -> Option<Value> {
    if n >= count(resource_type) {
        return None;
    }
    let mut v = match resource_type {
        "Medication" => medication(n),
        "Practitioner" => practitioner(seed, n),
        "PractitionerRole" => practitioner_role(seed, n),
        "Organization" => organization(seed, n),
        "Location" => location(seed, n),
        _ => return None,
    };
    if let Some(obj) = v.as_object_mut() {
        obj.insert("resourceType".into(), json!(resource_type));
        obj.insert("id".into(), json!(id(seed, resource_type, n)));
        obj.insert("meta".into(), meta(seed, resource_type, n));
    }
    Some(v)
}

/// Every resource of a catalogue type, in ordinal order (empty for other types).
pub(super) fn all(seed: u64, resource_type: &str) -> Vec<Value> {
    (0..count(resource_type))
        .filter_map(|n| resource(seed, resource_type, n))
        .collect()
}

fn meta(seed: u64, resource_type: &str, n: usize) -> Value {
    let mut r = rng_for(seed, SHARED, tag(resource_type) ^ 0x3E7A, n as u64);
    let day = jiff::civil::date(2020, 1, 1)
        .checked_add(jiff::Span::new().days(r.below(5 * 365) as i64))
        .unwrap_or(jiff::civil::date(2020, 1, 1));
    let second = r.below(24 * 3600);
    json!({"lastUpdated": format!(
        "{day}T{:02}:{:02}:{:02}Z",
        second / 3600,
        (second / 60) % 60,
        second % 60
    )})
}

fn concept(system: &str, code: &str, display: &str) -> Value {
    json!({"coding": [{"system": system, "code": code, "display": display}], "text": display})
}

/// A 10-digit NPI with a valid check digit (Luhn over `80840` + the first nine digits).
fn npi(seed: u64, resource_type: &str, n: usize) -> String {
    let mut r = rng_for(seed, SHARED, tag(resource_type) ^ 0x4E50, n as u64);
    // Individual NPIs start with 1, organisational ones with 2 (a convention, not a rule).
    let first = if resource_type == "Organization" {
        2
    } else {
        1
    };
    let base = format!("{first}{:08}", r.below(100_000_000));
    let mut sum = 24; // the digits of the 80840 prefix, doubled as the Luhn rule says
    for (i, d) in base.bytes().rev().enumerate() {
        let d = u32::from(d - b'0');
        sum += if i % 2 == 0 {
            let x = d * 2;
            x / 10 + x % 10
        } else {
            d
        };
    }
    format!("{base}{}", (10 - sum % 10) % 10)
}

fn phone(seed: u64, resource_type: &str, n: usize) -> String {
    let mut r = rng_for(seed, SHARED, tag(resource_type) ^ 0x7E1, n as u64);
    format!("608-{:03}-{:04}", r.range(200, 999), r.below(10_000))
}

fn medication(n: usize) -> Value {
    let (code, display, form) = MEDICATIONS[n];
    json!({
        "identifier": [{"use": "usual", "system": EPIC_MED_ID, "value": format!("{}", 10_000 + n * 37)}],
        "code": concept(RXNORM, code, display),
        "status": "active",
        "form": {"text": form},
    })
}

fn practitioner(seed: u64, n: usize) -> Value {
    let (given, family, credential, gender, ..) = PRACTITIONERS[n];
    json!({
        "identifier": [
            {"use": "usual", "type": {"text": "NPI"}, "system": NPI, "value": npi(seed, "Practitioner", n)},
            {"use": "usual", "type": {"text": "INTERNAL"}, "system": EPIC_SER_ID, "value": format!("E{}", 1000 + n * 13)},
        ],
        "active": true,
        "name": [{
            "use": "usual",
            "text": practitioner_name(&PRACTITIONERS[n]),
            "family": family,
            "given": [given],
            "suffix": [credential],
        }],
        "gender": gender,
        "telecom": [{"system": "phone", "value": phone(seed, "Practitioner", n), "use": "work"}],
        "qualification": [{"code": {"text": credential}}],
    })
}

fn practitioner_role(seed: u64, n: usize) -> Value {
    let (.., department, taxonomy, specialty, role) = PRACTITIONERS[n];
    let locations = locations_in(department);
    let location = locations[n % locations.len().max(1)];
    let role_display = if role == "nurse" { "Nurse" } else { "Doctor" };
    json!({
        "active": true,
        "practitioner": reference(seed, "Practitioner", n),
        "organization": reference(seed, "Organization", department),
        "code": [concept(PROVIDER_ROLE, role, role_display)],
        "specialty": [concept(NUCC, taxonomy, specialty)],
        "location": [reference(seed, "Location", location)],
        "telecom": [{"system": "phone", "value": phone(seed, "PractitionerRole", n), "use": "work"}],
    })
}

fn organization(seed: u64, n: usize) -> Value {
    let (name, type_code, type_display) = ORGANIZATIONS[n];
    let mut v = json!({
        "identifier": [
            {"use": "usual", "type": {"text": "NPI"}, "system": NPI, "value": npi(seed, "Organization", n)},
            {"use": "usual", "type": {"text": "INTERNAL"}, "system": EPIC_DEP_ID, "value": format!("{}", 101_000_000 + n * 1001)},
        ],
        "active": true,
        "type": [concept(ORG_TYPE, type_code, type_display)],
        "name": name,
        "telecom": [{"system": "phone", "value": phone(seed, "Organization", n), "use": "work"}],
        "address": [{"use": "work", "line": ["1 Lakeview Plaza"], "city": "Madison", "state": "WI", "postalCode": "53703", "country": "US"}],
    });
    if n != HEALTH_SYSTEM {
        v["partOf"] = reference(seed, "Organization", HEALTH_SYSTEM);
    }
    v
}

fn location(seed: u64, n: usize) -> Value {
    let (name, department, code, code_display, city, street) = LOCATIONS[n];
    json!({
        "identifier": [{"use": "usual", "type": {"text": "INTERNAL"}, "system": EPIC_DEP_ID, "value": format!("{}", 102_000_000 + n * 1003)}],
        "status": "active",
        "name": name,
        "mode": "instance",
        "type": [concept(ROLE_CODE, code, code_display)],
        "telecom": [{"system": "phone", "value": phone(seed, "Location", n), "use": "work"}],
        "address": {"use": "work", "line": [street], "city": city, "state": "WI", "country": "US"},
        "managingOrganization": reference(seed, "Organization", department),
    })
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn sandbox_catalogue_npis_have_valid_check_digits() {
        // The example NPI from the CMS check-digit paper.
        fn valid(npi: &str) -> bool {
            let digits: Vec<u32> = format!("80840{npi}")
                .bytes()
                .map(|b| u32::from(b - b'0'))
                .collect();
            let sum: u32 = digits
                .iter()
                .rev()
                .enumerate()
                .map(|(i, d)| {
                    if i % 2 == 1 {
                        (d * 2) / 10 + (d * 2) % 10
                    } else {
                        *d
                    }
                })
                .sum();
            sum.is_multiple_of(10)
        }
        assert!(valid("1234567893"));
        for t in ["Practitioner", "Organization"] {
            for n in 0..count(t) {
                let npi = npi(42, t, n);
                assert_eq!(npi.len(), 10);
                assert!(valid(&npi), "{t} {n}: {npi}");
            }
        }
    }
}
