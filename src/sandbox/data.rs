//! The sandbox's synthetic data set: deterministic FHIR R4 resources for N patients.
//!
//! Nothing is stored per resource. [`Dataset::generate`] only derives the patient ids; every
//! resource is rebuilt on demand from `(seed, patient index, type, ordinal)`, so a data set of
//! 10,000 patients costs a few hundred kilobytes and the same seed always yields the same JSON
//! (`meta.lastUpdated` included: it is derived too, spread over 2022-2025, never from the clock).
//! This module knows nothing about HTTP, paging or auth (see `fhir.rs` for those).

use std::collections::HashMap;

use serde_json::{Value, json};

/// The resource types that can be searched per patient (besides `Patient` itself).
pub const SEARCH_TYPES: &[&str] = &[
    "Condition",
    "Observation",
    "MedicationRequest",
    "AllergyIntolerance",
    "Immunization",
    "Procedure",
    "Encounter",
    "DiagnosticReport",
    "DocumentReference",
];

/// A tiny deterministic PRNG (splitmix64); good enough for synthetic data and fault rolls.
#[derive(Clone, Debug, Default)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// A value in `0..n` (0 when `n == 0`).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// A value in `lo..=hi`.
    pub(crate) fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo) + 1)
    }

    /// A float in `[0, 1)`.
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A PRNG for one (seed, patient, purpose, ordinal) tuple.
fn rng_for(seed: u64, patient: usize, tag: u64, n: u64) -> SplitMix64 {
    let mut h = mix(seed ^ 0xA076_1D64_78BD_642F);
    h = mix(h ^ patient as u64);
    h = mix(h ^ tag.wrapping_mul(0xE703_7ED1_A0B4_28DB));
    h = mix(h ^ n);
    SplitMix64::new(h)
}

/// Characters Epic-style FHIR ids are made of (all valid in a FHIR `id`).
const ID_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-.";

/// An Epic-looking FHIR id: `e` + 40 opaque characters + `3`.
fn fhir_id(seed: u64, patient: usize, tag: u64, n: u64) -> String {
    let mut rng = rng_for(seed, patient, tag ^ 0x1D, n);
    let mut id = String::with_capacity(42);
    id.push('e');
    let mut bits = 0u64;
    for i in 0..40 {
        if i % 10 == 0 {
            bits = rng.next_u64();
        }
        id.push(ID_CHARS[(bits & 63) as usize] as char);
        bits >>= 6;
    }
    id.push('3');
    id
}

fn type_tag(resource_type: &str) -> Option<u64> {
    if resource_type == "Patient" {
        return Some(100);
    }
    SEARCH_TYPES
        .iter()
        .position(|t| *t == resource_type)
        .map(|p| p as u64 + 1)
}

/// The synthetic patients (ids only; resources are built on demand).
#[derive(Debug, Clone)]
pub struct Dataset {
    seed: u64,
    ids: Vec<String>,
    index: HashMap<String, usize>,
}

impl Dataset {
    /// Derives `patients` patient ids from `seed`. Same arguments, same data set.
    pub fn generate(patients: usize, seed: u64) -> Dataset {
        let ids: Vec<String> = (0..patients)
            .map(|i| fhir_id(seed, i, type_tag("Patient").unwrap_or(100), 0))
            .collect();
        let index = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), i))
            .collect();
        Dataset { seed, ids, index }
    }

    /// Patient ids in generation order.
    pub fn patient_ids(&self) -> Vec<String> {
        self.ids.clone()
    }

    /// The number of patients.
    pub fn patient_count(&self) -> usize {
        self.ids.len()
    }

    /// The id of the patient at `index` in [`Dataset::patient_ids`].
    pub fn patient_id(&self, index: usize) -> Option<&str> {
        self.ids.get(index).map(String::as_str)
    }

    /// The position of a patient id in [`Dataset::patient_ids`].
    pub fn patient_index(&self, patient_id: &str) -> Option<usize> {
        self.index.get(patient_id).copied()
    }

    /// Every resource of `resource_type` belonging to `patient_id` (for Patient: the patient
    /// itself), as JSON values. Unknown patients and types give an empty list.
    pub fn resources(&self, resource_type: &str, patient_id: &str) -> Vec<Value> {
        let Some(idx) = self.patient_index(patient_id) else {
            return Vec::new();
        };
        let g = Gen {
            seed: self.seed,
            idx,
            pid: patient_id,
            profile: Profile::of(self.seed, idx),
        };
        match resource_type {
            "Patient" => vec![g.patient()],
            "Condition" => g.many("Condition", g.profile.conditions, Gen::condition),
            "Observation" => g.many("Observation", g.profile.observations(), Gen::observation),
            "MedicationRequest" => g.many("MedicationRequest", g.profile.meds, Gen::medication),
            "AllergyIntolerance" => g.many("AllergyIntolerance", g.profile.allergies, Gen::allergy),
            "Immunization" => g.many("Immunization", g.profile.immunizations, Gen::immunization),
            "Procedure" => g.many("Procedure", g.profile.procedures, Gen::procedure),
            "Encounter" => g.many("Encounter", g.profile.encounters, Gen::encounter),
            "DiagnosticReport" => g.many("DiagnosticReport", g.profile.reports(), Gen::report),
            "DocumentReference" => g.many("DocumentReference", g.profile.documents, Gen::document),
            _ => Vec::new(),
        }
    }

    /// Whether a first search page for this type and patient carries an OperationOutcome
    /// warning entry (every DocumentReference search; Condition for every third patient).
    pub fn search_has_outcome(&self, resource_type: &str, patient_id: &str) -> bool {
        match (resource_type, self.patient_index(patient_id)) {
            ("DocumentReference", Some(_)) => true,
            ("Condition", Some(i)) => i % 3 == 1,
            _ => false,
        }
    }
}

/// How many resources of each type one patient has.
#[derive(Debug, Clone, Copy)]
struct Profile {
    conditions: u64,
    labs: u64,
    vitals: u64,
    social: u64,
    meds: u64,
    allergies: u64,
    immunizations: u64,
    procedures: u64,
    encounters: u64,
    documents: u64,
}

impl Profile {
    fn of(seed: u64, idx: usize) -> Profile {
        let mut r = rng_for(seed, idx, 0xF00D, 0);
        // Every fourth patient (including the first) is "heavy": well over 3 pages of labs.
        let heavy = idx.is_multiple_of(4);
        Profile {
            conditions: r.range(0, 8),
            labs: if heavy {
                r.range(70, 120)
            } else {
                r.range(0, 30)
            },
            vitals: if heavy {
                r.range(20, 40)
            } else {
                r.range(0, 18)
            },
            social: r.range(0, 3),
            meds: r.range(0, 6),
            // Every fifth patient has no recorded allergies.
            allergies: if idx % 5 == 1 { 0 } else { r.range(0, 3) },
            immunizations: r.range(0, 6),
            procedures: r.range(0, 5),
            encounters: r.range(1, 10),
            documents: r.range(0, 4),
        }
    }

    fn observations(&self) -> u64 {
        self.labs + self.vitals + self.social
    }

    /// One lab DiagnosticReport per started group of five lab Observations.
    fn reports(&self) -> u64 {
        self.labs.div_ceil(LABS_PER_REPORT)
    }
}

const LABS_PER_REPORT: u64 = 5;

const LOINC: &str = "http://loinc.org";
const SNOMED: &str = "http://snomed.info/sct";
const RXNORM: &str = "http://www.nlm.nih.gov/research/umls/rxnorm";
const CVX: &str = "http://hl7.org/fhir/sid/cvx";
const UCUM: &str = "http://unitsofmeasure.org";
const OBS_CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/observation-category";
const MRN_SYSTEM: &str = "urn:oid:1.2.840.114350.1.13.0.1.7.5.737384.14";

/// (code, display, unit, low, high, decimals)
type Quantity = (&'static str, &'static str, &'static str, f64, f64, i32);

const LABS: &[Quantity] = &[
    (
        "2345-7",
        "Glucose [Mass/volume] in Serum or Plasma",
        "mg/dL",
        70.0,
        160.0,
        0,
    ),
    (
        "718-7",
        "Hemoglobin [Mass/volume] in Blood",
        "g/dL",
        11.0,
        17.5,
        1,
    ),
    (
        "2160-0",
        "Creatinine [Mass/volume] in Serum or Plasma",
        "mg/dL",
        0.6,
        1.4,
        2,
    ),
    (
        "2951-2",
        "Sodium [Moles/volume] in Serum or Plasma",
        "mmol/L",
        134.0,
        146.0,
        0,
    ),
    (
        "2823-3",
        "Potassium [Moles/volume] in Serum or Plasma",
        "mmol/L",
        3.4,
        5.2,
        1,
    ),
    (
        "4548-4",
        "Hemoglobin A1c/Hemoglobin.total in Blood",
        "%",
        4.8,
        9.5,
        1,
    ),
    (
        "2093-3",
        "Cholesterol [Mass/volume] in Serum or Plasma",
        "mg/dL",
        140.0,
        260.0,
        0,
    ),
    (
        "6690-2",
        "Leukocytes [#/volume] in Blood by Automated count",
        "10*3/uL",
        3.8,
        11.5,
        1,
    ),
];

/// Vital signs; the last one (oxygen saturation) is filed under vital-signs AND laboratory.
const VITALS: &[Quantity] = &[
    ("8867-4", "Heart rate", "/min", 55.0, 105.0, 0),
    ("8310-5", "Body temperature", "Cel", 36.1, 38.2, 1),
    ("29463-7", "Body weight", "kg", 48.0, 115.0, 1),
    ("8302-2", "Body height", "cm", 150.0, 195.0, 0),
    ("9279-1", "Respiratory rate", "/min", 12.0, 22.0, 0),
    (
        "2708-6",
        "Oxygen saturation in Arterial blood",
        "%",
        92.0,
        100.0,
        0,
    ),
];
const DUAL_CATEGORY_VITAL: usize = 5;

const SMOKING: &[(&str, &str)] = &[
    ("266919005", "Never smoked tobacco"),
    ("8517006", "Ex-smoker"),
    ("77176002", "Smoker"),
];

const CONDITIONS: &[(&str, &str)] = &[
    ("44054006", "Diabetes mellitus type 2"),
    ("38341003", "Hypertensive disorder, systemic arterial"),
    ("195967001", "Asthma"),
    ("55822004", "Hyperlipidemia"),
    ("35489007", "Depressive disorder"),
    ("40055000", "Chronic sinusitis"),
    ("239873007", "Osteoarthritis of knee"),
    ("267036007", "Dyspnea"),
    ("399211009", "History of myocardial infarction"),
];

const MEDICATIONS: &[(&str, &str)] = &[
    ("197361", "amlodipine 5 MG Oral Tablet"),
    (
        "860975",
        "24 HR metformin hydrochloride 500 MG Extended Release Oral Tablet",
    ),
    ("314076", "lisinopril 10 MG Oral Tablet"),
    ("617312", "atorvastatin 10 MG Oral Tablet"),
    (
        "745679",
        "200 ACTUAT albuterol 0.09 MG/ACTUAT Metered Dose Inhaler",
    ),
    ("310965", "ibuprofen 200 MG Oral Tablet"),
];

const ALLERGIES: &[(&str, &str)] = &[
    ("91936005", "Allergy to penicillin"),
    ("300913006", "Shellfish allergy"),
    ("91935009", "Allergy to peanuts"),
    ("418689008", "Allergy to grass pollen"),
];

const VACCINES: &[(&str, &str)] = &[
    ("140", "Influenza, seasonal, injectable, preservative free"),
    ("208", "COVID-19, mRNA, LNP-S, PF, 30 mcg/0.3 mL dose"),
    ("115", "Tdap"),
    ("133", "Pneumococcal conjugate PCV 13"),
    ("43", "Hepatitis B vaccine, adult dosage"),
    ("187", "Zoster vaccine recombinant"),
];

const PROCEDURES: &[(&str, &str)] = &[
    ("80146002", "Appendectomy"),
    ("73761001", "Colonoscopy"),
    ("274031008", "Rectal polypectomy"),
    ("18286008", "Catheter ablation of tissue of heart"),
    ("430193006", "Medication reconciliation"),
    ("76601001", "Intramuscular injection"),
];

const ENCOUNTER_KINDS: &[(&str, &str, &str, &str)] = &[
    ("AMB", "ambulatory", "185349003", "Encounter for check up"),
    ("AMB", "ambulatory", "390906007", "Follow-up encounter"),
    ("EMER", "emergency", "50849002", "Emergency room admission"),
    (
        "IMP",
        "inpatient encounter",
        "32485007",
        "Hospital admission",
    ),
];

const PANELS: &[(&str, &str)] = &[
    (
        "24323-8",
        "Comprehensive metabolic 2000 panel - Serum or Plasma",
    ),
    ("58410-2", "CBC panel - Blood by Automated count"),
    ("57698-3", "Lipid panel with direct LDL - Serum or Plasma"),
];

const NOTES: &[(&str, &str)] = &[
    ("11506-3", "Progress note"),
    ("18842-5", "Discharge summary"),
    ("34117-2", "History and physical note"),
];

const GIVEN_F: &[&str] = &[
    "Camila", "Olivia", "Mei", "Aisha", "Sofia", "Hannah", "Grace",
];
const GIVEN_M: &[&str] = &[
    "Derrick", "Liam", "Mateo", "Kenji", "Omar", "Lucas", "Theodore",
];
const FAMILY: &[&str] = &[
    "Lopez", "Lin", "Okafor", "Andersen", "Nguyen", "Patel", "Smith", "Moreau", "Kowalski",
];
const CITIES: &[(&str, &str, &str)] = &[
    ("Madison", "WI", "53703"),
    ("Verona", "WI", "53593"),
    ("Milwaukee", "WI", "53202"),
    ("Rockford", "IL", "61101"),
];
const STREETS: &[&str] = &[
    "Milky Way",
    "Oak Street",
    "Elm Avenue",
    "Lakeview Drive",
    "Main Street",
];

fn coding(system: &str, code: &str, display: &str) -> Value {
    json!({"system": system, "code": code, "display": display})
}

fn concept(system: &str, code: &str, display: &str) -> Value {
    json!({"coding": [coding(system, code, display)], "text": display})
}

fn category(code: &str, display: &str) -> Value {
    json!({"coding": [coding(OBS_CATEGORY, code, display)], "text": display})
}

/// `YYYY-MM-DD`, `days` after 2012-01-01.
fn date(days: u64) -> String {
    date_after(2012, days)
}

fn date_after(year: i16, days: u64) -> String {
    let base = jiff::civil::date(year, 1, 1);
    let span = jiff::Span::new().days(days.min(9000) as i64);
    base.checked_add(span).unwrap_or(base).to_string()
}

fn datetime(days: u64, minutes: u64) -> String {
    format!(
        "{}T{:02}:{:02}:00Z",
        date(days),
        (minutes / 60) % 24,
        minutes % 60
    )
}

fn quantity_value(r: &mut SplitMix64, q: &Quantity) -> f64 {
    let (_, _, _, lo, hi, decimals) = *q;
    let v = lo + (hi - lo) * r.unit();
    let f = 10f64.powi(decimals);
    (v * f).round() / f
}

/// Builds the resources of one patient.
struct Gen<'a> {
    seed: u64,
    idx: usize,
    pid: &'a str,
    profile: Profile,
}

impl Gen<'_> {
    fn id(&self, resource_type: &str, n: u64) -> String {
        fhir_id(self.seed, self.idx, type_tag(resource_type).unwrap_or(0), n)
    }

    fn rng(&self, resource_type: &str, n: u64) -> SplitMix64 {
        rng_for(self.seed, self.idx, type_tag(resource_type).unwrap_or(0), n)
    }

    fn subject(&self) -> Value {
        json!({"reference": format!("Patient/{}", self.pid)})
    }

    fn many(
        &self,
        resource_type: &str,
        count: u64,
        build: fn(&Self, u64, &mut SplitMix64) -> Value,
    ) -> Vec<Value> {
        (0..count)
            .map(|n| {
                let mut r = self.rng(resource_type, n);
                let mut v = build(self, n, &mut r);
                if let Some(obj) = v.as_object_mut() {
                    obj.insert("resourceType".into(), json!(resource_type));
                    obj.insert("id".into(), json!(self.id(resource_type, n)));
                    obj.insert("meta".into(), self.meta(resource_type, n));
                }
                v
            })
            .collect()
    }

    /// `meta.lastUpdated`: a deterministic instant in 2022-2025, so `_since` selects a subset.
    fn meta(&self, resource_type: &str, n: u64) -> Value {
        let mut r = rng_for(
            self.seed,
            self.idx,
            type_tag(resource_type).unwrap_or(0) ^ 0x3E7A,
            n,
        );
        let day = date_after(2022, r.below(4 * 365));
        let second = r.below(24 * 3600);
        json!({"lastUpdated": format!(
            "{day}T{:02}:{:02}:{:02}Z",
            second / 3600,
            (second / 60) % 60,
            second % 60
        )})
    }

    fn patient(&self) -> Value {
        let mut r = rng_for(self.seed, self.idx, 100, 1);
        let female = r.below(2) == 0;
        let given = if female {
            r.pick(GIVEN_F)
        } else {
            r.pick(GIVEN_M)
        };
        let family = r.pick(FAMILY);
        let (city, state, zip) = *r.pick(CITIES);
        let street = format!("{} {}", r.range(1, 9999), r.pick(STREETS));
        json!({
            "resourceType": "Patient",
            "id": self.pid,
            "meta": self.meta("Patient", 0),
            "active": true,
            "identifier": [{
                "use": "usual",
                "type": {"text": "EPIC"},
                "system": MRN_SYSTEM,
                "value": format!("{}", 200_000_000 + (self.idx as u64) * 7 + r.below(7)),
            }],
            "name": [{"use": "official", "text": format!("{given} {family}"), "family": family, "given": [given]}],
            "gender": if female { "female" } else { "male" },
            "birthDate": date_after(1935, r.below(365 * 70)),
            "address": [{"use": "home", "line": [street], "city": city, "state": state, "postalCode": zip, "country": "US"}],
            "telecom": [{"system": "phone", "value": format!("608-{:03}-{:04}", r.range(200, 999), r.below(10_000)), "use": "home"}],
        })
    }

    fn condition(&self, _n: u64, r: &mut SplitMix64) -> Value {
        let (code, display) = *r.pick(CONDITIONS);
        let onset = r.below(4000);
        let active = r.below(4) != 0;
        json!({
            "clinicalStatus": concept("http://terminology.hl7.org/CodeSystem/condition-clinical",
                if active { "active" } else { "resolved" }, if active { "Active" } else { "Resolved" }),
            "verificationStatus": concept("http://terminology.hl7.org/CodeSystem/condition-ver-status", "confirmed", "Confirmed"),
            "category": [concept("http://terminology.hl7.org/CodeSystem/condition-category", "problem-list-item", "Problem List Item")],
            "code": concept(SNOMED, code, display),
            "subject": self.subject(),
            "onsetDateTime": date(onset),
            "recordedDate": date(onset + r.below(30)),
        })
    }

    fn observation(&self, n: u64, r: &mut SplitMix64) -> Value {
        let p = self.profile;
        let day = r.below(4500);
        let when = datetime(day, r.below(24 * 60));
        let mut obs = if n < p.labs {
            let q = &LABS[(n as usize) % LABS.len()];
            json!({
                "category": [category("laboratory", "Laboratory")],
                "code": concept(LOINC, q.0, q.1),
                "valueQuantity": {"value": quantity_value(r, q), "unit": q.2, "system": UCUM, "code": q.2},
            })
        } else if n < p.labs + p.vitals {
            let k = ((n - p.labs) as usize) % VITALS.len();
            let q = &VITALS[k];
            let mut cats = vec![category("vital-signs", "Vital Signs")];
            if k == DUAL_CATEGORY_VITAL {
                cats.push(category("laboratory", "Laboratory"));
            }
            json!({
                "category": cats,
                "code": concept(LOINC, q.0, q.1),
                "valueQuantity": {"value": quantity_value(r, q), "unit": q.2, "system": UCUM, "code": q.2},
            })
        } else {
            let (code, display) = *r.pick(SMOKING);
            json!({
                "category": [category("social-history", "Social History")],
                "code": concept(LOINC, "72166-2", "Tobacco smoking status"),
                "valueCodeableConcept": concept(SNOMED, code, display),
            })
        };
        if let Some(o) = obs.as_object_mut() {
            o.insert("status".into(), json!("final"));
            o.insert("subject".into(), self.subject());
            o.insert("effectiveDateTime".into(), json!(when));
            o.insert("issued".into(), json!(when));
        }
        obs
    }

    fn medication(&self, _n: u64, r: &mut SplitMix64) -> Value {
        let (code, display) = *r.pick(MEDICATIONS);
        let active = r.below(3) != 0;
        json!({
            "status": if active { "active" } else { "completed" },
            "intent": "order",
            "category": [concept("http://terminology.hl7.org/CodeSystem/medicationrequest-category", "community", "Community")],
            "medicationCodeableConcept": concept(RXNORM, code, display),
            "subject": self.subject(),
            "authoredOn": date(r.below(4500)),
            "dosageInstruction": [{"text": format!("Take {} tablet(s) by mouth daily", r.range(1, 2))}],
        })
    }

    fn allergy(&self, _n: u64, r: &mut SplitMix64) -> Value {
        let (code, display) = *r.pick(ALLERGIES);
        json!({
            "clinicalStatus": concept("http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "active", "Active"),
            "verificationStatus": concept("http://terminology.hl7.org/CodeSystem/allergyintolerance-verification", "confirmed", "Confirmed"),
            "type": "allergy",
            "category": [if code == "418689008" { "environment" } else { "food" }],
            "criticality": if r.below(3) == 0 { "high" } else { "low" },
            "code": concept(SNOMED, code, display),
            "patient": self.subject(),
            "recordedDate": date(r.below(4500)),
        })
    }

    fn immunization(&self, _n: u64, r: &mut SplitMix64) -> Value {
        let (code, display) = *r.pick(VACCINES);
        json!({
            "status": "completed",
            "vaccineCode": concept(CVX, code, display),
            "patient": self.subject(),
            "occurrenceDateTime": datetime(r.below(4500), r.below(24 * 60)),
            "primarySource": true,
            "lotNumber": format!("L{:06}", r.below(1_000_000)),
        })
    }

    fn procedure(&self, _n: u64, r: &mut SplitMix64) -> Value {
        let (code, display) = *r.pick(PROCEDURES);
        json!({
            "status": "completed",
            "code": concept(SNOMED, code, display),
            "subject": self.subject(),
            "performedDateTime": datetime(r.below(4500), r.below(24 * 60)),
        })
    }

    fn encounter(&self, _n: u64, r: &mut SplitMix64) -> Value {
        let (class, class_display, code, display) = *r.pick(ENCOUNTER_KINDS);
        let day = r.below(4500);
        let start = r.range(7 * 60, 17 * 60);
        json!({
            "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": class, "display": class_display},
            "type": [concept(SNOMED, code, display)],
            "subject": self.subject(),
            "period": {"start": datetime(day, start), "end": datetime(day, start + r.range(15, 120))},
        })
    }

    fn report(&self, n: u64, r: &mut SplitMix64) -> Value {
        let (code, display) = *r.pick(PANELS);
        let first = n * LABS_PER_REPORT;
        let last = (first + LABS_PER_REPORT).min(self.profile.labs);
        let results: Vec<Value> = (first..last)
            .map(|i| json!({"reference": format!("Observation/{}", self.id("Observation", i))}))
            .collect();
        let when = datetime(r.below(4500), r.below(24 * 60));
        json!({
            "status": "final",
            "category": [concept("http://terminology.hl7.org/CodeSystem/v2-0074", "LAB", "Laboratory")],
            "code": concept(LOINC, code, display),
            "subject": self.subject(),
            "effectiveDateTime": when,
            "issued": when,
            "result": results,
        })
    }

    fn document(&self, n: u64, r: &mut SplitMix64) -> Value {
        let (code, display) = *r.pick(NOTES);
        let binary = fhir_id(self.seed, self.idx, 200, n);
        json!({
            "status": "current",
            "docStatus": "final",
            "type": concept(LOINC, code, display),
            "category": [concept("http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category", "clinical-note", "Clinical Note")],
            "subject": self.subject(),
            "date": datetime(r.below(4500), r.below(24 * 60)),
            "content": [{
                "attachment": {"contentType": "text/html", "url": format!("Binary/{binary}")},
                "format": {"system": "http://ihe.net/fhir/ihe.formatcode.fhir/CodeSystem/formatcode", "code": "urn:ihe:iti:xds:2017:mimeTypeSufficient", "display": "mimeType Sufficient"},
            }],
        })
    }
}
