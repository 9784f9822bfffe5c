//! The sandbox's synthetic data set: deterministic FHIR R4 resources for N patients, the
//! resources they share, and the attachments of their documents.
//!
//! Nothing is stored per resource. [`Dataset::generate`] only derives the patient ids (and
//! indexes the few dozen catalogue ids); every resource is rebuilt on demand from
//! `(seed, patient index, type, ordinal)`, so a data set of 10,000 patients costs a few hundred
//! kilobytes and the same seed always yields the same JSON (`meta.lastUpdated` included: it is
//! derived too, spread over 2022-2025, never from the clock).
//!
//! Per patient: Patient, Condition, Observation (labs, vitals, smoking status), MedicationRequest,
//! AllergyIntolerance, Immunization, Procedure, Encounter, DiagnosticReport (one per five labs)
//! and DocumentReference. They reference the shared catalogue (`catalogue.rs`) the way Epic's
//! do: MedicationRequest `medicationReference` → Medication and `requester` → PractitionerRole;
//! Encounter `participant` → Practitioner, `serviceProvider` → Organization, `location` →
//! Location; DocumentReference `author` → Practitioner; DiagnosticReport `performer` →
//! Organization. Documents carry attachments (`documents.rs` renders their bytes):
//!
//! - four DocumentReferences in five are clinical notes with two `content` entries, `text/html`
//!   and `text/rtf`, pointing at the same `Binary/{id}`; the fifth is a scanned document with one
//!   `application/pdf` attachment;
//! - every other DiagnosticReport (even ordinals) has one `presentedForm`, a PDF (two in three)
//!   or HTML rendering of the report.
//!
//! [`Dataset::binary`] maps a Binary id back to its content, [`Dataset::binary_ids`] lists a
//! patient's. This module knows nothing about HTTP, paging or auth (see `fhir.rs` for those).

use std::collections::HashMap;

use serde_json::{Value, json};

use super::catalogue::{self, CATALOGUE_TYPES};
use super::documents::{self, BinaryDoc, NoteFacts, Source};
use super::rng::{SplitMix64, fhir_id, rng_for};

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
    /// Catalogue id → (type, ordinal).
    catalogue: HashMap<String, (&'static str, usize)>,
    /// Where DocumentReference attachments live, when not `Binary/{id}` (see
    /// [`Dataset::with_attachment_base`]).
    attachment_base: Option<String>,
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
        let catalogue = CATALOGUE_TYPES
            .iter()
            .flat_map(|t| {
                (0..catalogue::count(t)).map(move |n| (catalogue::id(seed, t, n), (*t, n)))
            })
            .collect();
        Dataset {
            seed,
            ids,
            index,
            catalogue,
            attachment_base: None,
        }
    }

    /// The same data set with DocumentReference attachment URLs absolute, `{base}/{binary id}`
    /// (e.g. `http://127.0.0.1:PORT/notes`), instead of `Binary/{binary id}` relative to the
    /// FHIR base. DiagnosticReport `presentedForm` URLs stay `Binary/{id}`.
    pub fn with_attachment_base(mut self, base: impl Into<String>) -> Dataset {
        self.attachment_base = Some(base.into().trim_end_matches('/').to_string());
        self
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

    fn gen_for<'a>(&'a self, idx: usize, pid: &'a str) -> Gen<'a> {
        Gen {
            seed: self.seed,
            idx,
            pid,
            profile: Profile::of(self.seed, idx),
            attachment_base: self.attachment_base.as_deref(),
        }
    }

    /// Every resource of `resource_type` belonging to `patient_id` (for Patient: the patient
    /// itself), as JSON values. Unknown patients and types give an empty list, and so do the
    /// catalogue types (they are not in the patient compartment; see [`Dataset::catalogue`]).
    pub fn resources(&self, resource_type: &str, patient_id: &str) -> Vec<Value> {
        let Some(idx) = self.patient_index(patient_id) else {
            return Vec::new();
        };
        let g = self.gen_for(idx, patient_id);
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

    /// Every shared resource of a catalogue type ([`CATALOGUE_TYPES`]: Medication,
    /// Practitioner, PractitionerRole, Organization, Location), in a fixed order; empty for
    /// other types.
    pub fn catalogue(&self, resource_type: &str) -> Vec<Value> {
        catalogue::all(self.seed, resource_type)
    }

    /// One shared resource by type and id (what `GET {base}/{Type}/{id}` answers).
    pub fn catalogue_resource(&self, resource_type: &str, id: &str) -> Option<Value> {
        let (t, n) = *self.catalogue.get(id)?;
        (t == resource_type)
            .then(|| catalogue::resource(self.seed, t, n))
            .flatten()
    }

    /// The ids of the Binaries a patient's resources reference: one per DocumentReference
    /// (both of a note's content entries point at the same one), then one per DiagnosticReport
    /// with a `presentedForm`, in resource order. Empty for an unknown patient.
    pub fn binary_ids(&self, patient_id: &str) -> Vec<String> {
        let Some(idx) = self.patient_index(patient_id) else {
            return Vec::new();
        };
        let profile = Profile::of(self.seed, idx);
        let documents = (0..profile.documents)
            .map(|n| documents::binary_id(self.seed, idx, Source::Document, n));
        let reports = (0..profile.reports())
            .filter(|n| report_has_form(*n))
            .map(|n| documents::binary_id(self.seed, idx, Source::Report, n));
        documents.chain(reports).collect()
    }

    /// The content behind `Binary/{id}` (what the sandbox serves for it, in every content
    /// type), or `None` for an id no resource of this data set references.
    pub fn binary(&self, id: &str) -> Option<BinaryDoc> {
        let (idx, source, n) = documents::decode_binary_id(self.seed, id)?;
        let pid = self.patient_id(idx)?;
        let g = self.gen_for(idx, pid);
        match source {
            Source::Document if n < g.profile.documents => Some(g.document_binary(n, id)),
            Source::Report if n < g.profile.reports() && report_has_form(n) => {
                Some(g.report_binary(n, id))
            }
            _ => None,
        }
    }
}

/// Whether DiagnosticReport `n` has a `presentedForm` (every other one).
fn report_has_form(n: u64) -> bool {
    n.is_multiple_of(2)
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

/// Document types of scanned (PDF) documents.
const SCANNED: &[(&str, &str)] = &[
    ("59284-0", "Consent Document"),
    ("11488-4", "Consult note"),
    ("34133-9", "Summary of episode note"),
];

const FORMAT_CODE: &str = "http://ihe.net/fhir/ihe.formatcode.fhir/CodeSystem/formatcode";

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
    /// See [`Dataset::with_attachment_base`].
    attachment_base: Option<&'a str>,
}

/// What a DocumentReference is, drawn from its own stream so its Binary can be rendered
/// without the rest of the resource.
struct DocFacts {
    scanned: bool,
    code: &'static str,
    display: &'static str,
    when: String,
    /// Practitioner ordinal of the author.
    author: usize,
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
            .map(|n| self.one(resource_type, n, build))
            .collect()
    }

    /// Resource `n` of a type, exactly as [`Gen::many`] builds it.
    fn one(
        &self,
        resource_type: &str,
        n: u64,
        build: fn(&Self, u64, &mut SplitMix64) -> Value,
    ) -> Value {
        let mut r = self.rng(resource_type, n);
        let mut v = build(self, n, &mut r);
        if let Some(obj) = v.as_object_mut() {
            obj.insert("resourceType".into(), json!(resource_type));
            obj.insert("id".into(), json!(self.id(resource_type, n)));
            obj.insert("meta".into(), self.meta(resource_type, n));
        }
        v
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
        let med = r.below(catalogue::MEDICATIONS.len() as u64) as usize;
        let active = r.below(3) != 0;
        let prescribers = catalogue::practitioners_in(catalogue::DEPT_PRIMARY_CARE);
        let requester = *r.pick(&prescribers);
        json!({
            "status": if active { "active" } else { "completed" },
            "intent": "order",
            "category": [concept("http://terminology.hl7.org/CodeSystem/medicationrequest-category", "community", "Community")],
            "medicationReference": catalogue::reference(self.seed, "Medication", med),
            "subject": self.subject(),
            "authoredOn": date(r.below(4500)),
            "requester": catalogue::reference(self.seed, "PractitionerRole", requester),
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
        let end = start + r.range(15, 120);
        let department = if class == "EMER" {
            catalogue::DEPT_EMERGENCY
        } else {
            catalogue::DEPT_PRIMARY_CARE
        };
        let practitioner = *r.pick(&catalogue::practitioners_in(department));
        let location = *r.pick(&catalogue::locations_in(department));
        json!({
            "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": class, "display": class_display},
            "type": [concept(SNOMED, code, display)],
            "subject": self.subject(),
            "participant": [{
                "type": [concept("http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "ATND", "attender")],
                "individual": catalogue::reference(self.seed, "Practitioner", practitioner),
            }],
            "period": {"start": datetime(day, start), "end": datetime(day, end)},
            "location": [{"location": catalogue::reference(self.seed, "Location", location)}],
            "serviceProvider": catalogue::reference(self.seed, "Organization", department),
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
        let mut report = json!({
            "status": "final",
            "category": [concept("http://terminology.hl7.org/CodeSystem/v2-0074", "LAB", "Laboratory")],
            "code": concept(LOINC, code, display),
            "subject": self.subject(),
            "effectiveDateTime": when,
            "issued": when,
            "performer": [catalogue::reference(self.seed, "Organization", catalogue::DEPT_LABORATORY)],
            "result": results,
        });
        if report_has_form(n) {
            report["presentedForm"] = json!([{
                "contentType": self.report_form_type(n),
                "url": format!("Binary/{}", documents::binary_id(self.seed, self.idx, Source::Report, n)),
                "title": display,
            }]);
        }
        report
    }

    /// The content type of a DiagnosticReport's `presentedForm`: PDF for two in three.
    fn report_form_type(&self, n: u64) -> &'static str {
        let mut r = rng_for(self.seed, self.idx, 0xF0A4, n);
        if r.below(3) == 0 {
            documents::HTML
        } else {
            documents::PDF
        }
    }

    fn doc_facts(&self, n: u64) -> DocFacts {
        let mut r = rng_for(self.seed, self.idx, 0xD0C5, n);
        let scanned = r.below(5) == 0;
        let (code, display) = *r.pick(if scanned { SCANNED } else { NOTES });
        let when = datetime(r.below(4500), r.below(24 * 60));
        let mut authors = catalogue::practitioners_in(catalogue::DEPT_PRIMARY_CARE);
        authors.extend(catalogue::practitioners_in(catalogue::DEPT_EMERGENCY));
        let author = *r.pick(&authors);
        DocFacts {
            scanned,
            code,
            display,
            when,
            author,
        }
    }

    fn document(&self, n: u64, _r: &mut SplitMix64) -> Value {
        let f = self.doc_facts(n);
        let binary = documents::binary_id(self.seed, self.idx, Source::Document, n);
        let url = match self.attachment_base {
            Some(base) => format!("{base}/{binary}"),
            None => format!("Binary/{binary}"),
        };
        let format = json!({"system": FORMAT_CODE, "code": "urn:ihe:iti:xds:2017:mimeTypeSufficient", "display": "mimeType Sufficient"});
        let types: &[&str] = if f.scanned {
            &[documents::PDF]
        } else {
            &[documents::HTML, documents::RTF]
        };
        let content: Vec<Value> = types
            .iter()
            .map(|t| json!({"attachment": {"contentType": t, "url": url}, "format": format}))
            .collect();
        json!({
            "status": "current",
            "docStatus": "final",
            "type": concept(LOINC, f.code, f.display),
            "category": [concept("http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category", "clinical-note", "Clinical Note")],
            "subject": self.subject(),
            "date": f.when,
            "author": [catalogue::reference(self.seed, "Practitioner", f.author)],
            "content": content,
        })
    }

    /// A patient's name, MRN and birth year, as a note header shows them.
    fn patient_facts(patient: &Value) -> (String, String, u64) {
        let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
        let birth_year: u64 = patient["birthDate"]
            .as_str()
            .and_then(|b| b.get(..4))
            .and_then(|y| y.parse().ok())
            .unwrap_or(1970);
        (
            text(&patient["name"][0]["text"]),
            text(&patient["identifier"][0]["value"]),
            birth_year,
        )
    }

    /// Distinct `display`/`text` values of a patient's resources, in order.
    fn distinct(values: impl Iterator<Item = Option<String>>) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for v in values.flatten() {
            if !out.contains(&v) {
                out.push(v);
            }
        }
        out
    }

    /// Renders the attachment of DocumentReference `n`.
    fn document_binary(&self, n: u64, id: &str) -> BinaryDoc {
        let f = self.doc_facts(n);
        let patient = self.patient();
        let problems = Self::distinct(
            self.many("Condition", self.profile.conditions, Gen::condition)
                .iter()
                .map(|c| c["code"]["text"].as_str().map(str::to_string)),
        );
        let medications = Self::distinct(
            self.many("MedicationRequest", self.profile.meds, Gen::medication)
                .iter()
                .filter(|m| m["status"] == "active")
                .map(|m| {
                    m["medicationReference"]["display"]
                        .as_str()
                        .map(str::to_string)
                }),
        );
        let (name, mrn, birth_year) = Self::patient_facts(&patient);
        let year: u64 = f.when.get(..4).and_then(|y| y.parse().ok()).unwrap_or(2020);
        let author = catalogue::practitioner_display(f.author);
        let department =
            catalogue::organization_display(catalogue::practitioner_department(f.author));
        let facts = NoteFacts {
            code: f.code,
            title: f.display,
            patient: &name,
            sex: patient["gender"].as_str().unwrap_or("patient"),
            age: year.saturating_sub(birth_year),
            birth_date: patient["birthDate"].as_str().unwrap_or_default(),
            mrn: &mrn,
            when: &f.when,
            author: &author,
            department: &department,
            problems: &problems,
            medications: &medications,
        };
        let mut r = rng_for(self.seed, self.idx, 0xB0D7, n);
        if f.scanned {
            let pages = r.range(1, 6);
            let note = documents::scanned_note(&facts, pages);
            let filler = r.range(4_000, 34_000) as usize;
            documents::pdf_doc(id, &note, filler, &mut r)
        } else {
            documents::note_doc(id, &documents::clinical_note(&facts, &mut r))
        }
    }

    /// Renders the `presentedForm` of DiagnosticReport `n`.
    fn report_binary(&self, n: u64, id: &str) -> BinaryDoc {
        let report = self.one("DiagnosticReport", n, Gen::report);
        let patient = self.patient();
        let (name, mrn, _) = Self::patient_facts(&patient);
        let title = report["code"]["text"]
            .as_str()
            .unwrap_or("Laboratory report");
        let when = report["effectiveDateTime"].as_str().unwrap_or_default();
        let first = n * LABS_PER_REPORT;
        let last = (first + LABS_PER_REPORT).min(self.profile.labs);
        let results: Vec<String> = (first..last)
            .map(|i| {
                let obs = self.one("Observation", i, Gen::observation);
                let q = &LABS[(i as usize) % LABS.len()];
                let value = obs["valueQuantity"]["value"].as_f64().unwrap_or_default();
                format!("{}: {:.*} {}", q.1, q.5.max(0) as usize, value, q.2)
            })
            .collect();
        let lab = catalogue::organization_display(catalogue::DEPT_LABORATORY);
        let note = documents::Note {
            title: title.to_string(),
            header: [
                ("Patient", name.as_str()),
                (
                    "Date of birth",
                    patient["birthDate"].as_str().unwrap_or_default(),
                ),
                ("MRN", mrn.as_str()),
                ("Collected", when),
                ("Performing lab", lab.as_str()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            sections: vec![documents::Section {
                heading: "Results".into(),
                paragraphs: Vec::new(),
                items: results,
            }],
            footer: format!("Final report, resulted {when} by {lab}"),
        };
        if self.report_form_type(n) == documents::PDF {
            let mut r = rng_for(self.seed, self.idx, 0xB0D8, n);
            let filler = r.range(4_000, 20_000) as usize;
            documents::pdf_doc(id, &note, filler, &mut r)
        } else {
            documents::html_doc(id, &note)
        }
    }
}
