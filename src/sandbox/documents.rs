//! Attachments of the sandbox's clinical documents: Binary ids and the bytes behind them.
//!
//! A Binary id encodes where its content comes from: the patient index, the source resource
//! type ([`Source`]) and that resource's ordinal are packed into 64 bits, scrambled with a
//! seed-keyed bijection ([`mix`]) and written as the first 11 characters after the `e`; the rest
//! of the id is derived from the same tuple and acts as a check. So an id maps back to its
//! content without any per-resource state, and a made-up id is rejected (see
//! [`decode_binary_id`]).
//!
//! The content is rendered from a [`Note`] (title, header fields, sections) that `data.rs`
//! assembles from the patient's resources: a clinical note as HTML (`text/html`, 1-4 KB) and the
//! same note as RTF (`text/rtf`), or a PDF (`application/pdf`, 5-40 KB: the text plus a
//! deterministic greyscale "scan" image; starts with `%PDF-1.4`, ends with `%%EOF`, valid xref).
//! The sentences come from the fixed tables below, drawn with the document's own PRNG stream.

use super::rng::{ID_CHARS, ID_LEN, SplitMix64, id_char_value, mix, push_id_chars, rng_for, unmix};

pub(super) const HTML: &str = "text/html";
pub(super) const RTF: &str = "text/rtf";
pub(super) const PDF: &str = "application/pdf";

/// Which kind of resource references a Binary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Source {
    /// `DocumentReference.content[].attachment`.
    Document = 0,
    /// `DiagnosticReport.presentedForm[]`.
    Report = 1,
}

/// Bits of the payload holding the ordinal.
const ORDINAL_BITS: u32 = 30;

fn key(seed: u64) -> u64 {
    mix(seed ^ 0xB1A7_D0C5_0000_0001)
}

/// The Binary id of the attachment of resource `n` of `source` for the patient at `patient`.
pub(super) fn binary_id(seed: u64, patient: usize, source: Source, n: u64) -> String {
    let payload = ((patient as u64) << 32)
        | ((source as u64) << ORDINAL_BITS)
        | (n & ((1 << ORDINAL_BITS) - 1));
    let scrambled = mix(payload ^ key(seed));
    let mut check = rng_for(seed, patient, 300 + source as u64, n);
    let spare = check.next_u64();
    let mut id = String::with_capacity(ID_LEN);
    id.push('e');
    // 64 bits in 11 characters: ten of 6 bits, then the top 4 bits plus 2 check bits.
    for i in 0..10 {
        id.push(ID_CHARS[((scrambled >> (6 * i)) & 63) as usize] as char);
    }
    id.push(ID_CHARS[(((scrambled >> 60) & 15) | ((spare & 3) << 4)) as usize] as char);
    push_id_chars(&mut id, &mut check, ID_LEN - 13);
    id.push('3');
    id
}

/// The (patient index, source, ordinal) a Binary id was made from, if it is one of ours. The
/// caller still has to check that the patient and the resource exist.
pub(super) fn decode_binary_id(seed: u64, id: &str) -> Option<(usize, Source, u64)> {
    let b = id.as_bytes();
    if b.len() != ID_LEN || b[0] != b'e' || b[ID_LEN - 1] != b'3' {
        return None;
    }
    let mut scrambled = 0u64;
    for i in 0..10 {
        scrambled |= id_char_value(b[1 + i])? << (6 * i);
    }
    scrambled |= (id_char_value(b[11])? & 15) << 60;
    let payload = unmix(scrambled) ^ key(seed);
    let patient = usize::try_from(payload >> 32).ok()?;
    let source = match (payload >> ORDINAL_BITS) & 3 {
        0 => Source::Document,
        1 => Source::Report,
        _ => return None,
    };
    let n = payload & ((1 << ORDINAL_BITS) - 1);
    (binary_id(seed, patient, source, n) == id).then_some((patient, source, n))
}

/// The content of one Binary, in each of its content types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryDoc {
    /// The Binary id (`Binary/{id}`).
    pub id: String,
    /// The content types it can be served as, the default one (the FHIR Binary's
    /// `contentType`) first: `["text/html", "text/rtf"]` for a clinical note,
    /// `["application/pdf"]` for a scanned document or a PDF lab report, `["text/html"]` for an
    /// HTML lab report.
    pub content_types: Vec<&'static str>,
    contents: Vec<Vec<u8>>,
}

impl BinaryDoc {
    fn new(id: &str, contents: Vec<(&'static str, Vec<u8>)>) -> BinaryDoc {
        let (content_types, contents) = contents.into_iter().unzip();
        BinaryDoc {
            id: id.to_string(),
            content_types,
            contents,
        }
    }

    /// The content type of the FHIR Binary resource (the first of [`BinaryDoc::content_types`]).
    pub fn default_content_type(&self) -> &'static str {
        self.content_types.first().copied().unwrap_or(HTML)
    }

    /// The bytes served for `content_type` (case-insensitive, parameters such as `charset`
    /// ignored), or `None` if this Binary has no such representation.
    pub fn bytes(&self, content_type: &str) -> Option<Vec<u8>> {
        self.representation(content_type)
            .map(|(_, bytes)| bytes.to_vec())
    }

    /// The content type as listed in [`BinaryDoc::content_types`] and its bytes.
    pub(super) fn representation(&self, content_type: &str) -> Option<(&'static str, &[u8])> {
        let wanted = content_type.split(';').next().unwrap_or_default().trim();
        self.content_types
            .iter()
            .position(|t| t.eq_ignore_ascii_case(wanted))
            .map(|i| (self.content_types[i], self.contents[i].as_slice()))
    }
}

/// A document's text, in a structure every format can render.
#[derive(Debug, Clone, Default)]
pub(super) struct Note {
    pub(super) title: String,
    /// Label/value lines under the title (patient, date, author...).
    pub(super) header: Vec<(String, String)>,
    pub(super) sections: Vec<Section>,
    /// The closing line (e.g. the electronic signature).
    pub(super) footer: String,
}

#[derive(Debug, Clone, Default)]
pub(super) struct Section {
    pub(super) heading: String,
    pub(super) paragraphs: Vec<String>,
    pub(super) items: Vec<String>,
}

/// What `data.rs` knows about a clinical note and its patient.
pub(super) struct NoteFacts<'a> {
    /// The LOINC code of the document type (selects the sections).
    pub(super) code: &'a str,
    pub(super) title: &'a str,
    pub(super) patient: &'a str,
    pub(super) sex: &'a str,
    pub(super) age: u64,
    pub(super) birth_date: &'a str,
    pub(super) mrn: &'a str,
    pub(super) when: &'a str,
    pub(super) author: &'a str,
    pub(super) department: &'a str,
    pub(super) problems: &'a [String],
    pub(super) medications: &'a [String],
}

impl NoteFacts<'_> {
    fn header(&self) -> Vec<(String, String)> {
        [
            ("Patient", self.patient),
            ("Date of birth", self.birth_date),
            ("MRN", self.mrn),
            ("Date of service", self.when),
            ("Author", self.author),
            ("Department", self.department),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }
}

const COMPLAINTS: &[&str] = &[
    "follow-up of chronic conditions",
    "cough and shortness of breath for five days",
    "fatigue over the past month",
    "chest discomfort with exertion",
    "a medication refill",
    "low back pain after lifting",
    "intermittent dizziness",
    "elevated blood pressure readings at home",
    "an annual wellness visit",
    "right knee pain",
];

const HPI: &[&str] = &[
    "Symptoms began gradually and have been stable over the past week.",
    "The patient reports good adherence to the current medication regimen.",
    "Home blood pressure readings have averaged in the 130s systolic.",
    "Denies fever, chills, or night sweats.",
    "Sleep has been fair, with occasional difficulty falling asleep.",
    "No recent hospitalizations or emergency department visits.",
    "Appetite is normal and weight has been stable.",
    "The patient walks about 30 minutes on most days of the week.",
    "Reports mild intermittent headaches relieved by over-the-counter analgesics.",
    "Symptoms are worse in the evening and improve with rest.",
    "A family member accompanies the patient today and contributes to the history.",
];

const ROS: &[&str] = &[
    "Constitutional: negative for fever and unintentional weight loss.",
    "Cardiovascular: negative for palpitations and leg swelling.",
    "Respiratory: positive for mild exertional dyspnea; negative for hemoptysis.",
    "Gastrointestinal: negative for nausea, vomiting, and abdominal pain.",
    "Musculoskeletal: positive for intermittent joint stiffness in the morning.",
    "Neurological: negative for focal weakness or numbness.",
    "Psychiatric: mood is described as good; no suicidal ideation.",
];

const EXAM: &[&str] = &[
    "General: well-appearing, in no acute distress.",
    "HEENT: normocephalic, atraumatic; oropharynx clear.",
    "Neck: supple, no lymphadenopathy or thyromegaly.",
    "Lungs: clear to auscultation bilaterally, no wheezes or crackles.",
    "Heart: regular rate and rhythm, no murmurs, rubs, or gallops.",
    "Abdomen: soft, non-tender, non-distended; normal bowel sounds.",
    "Extremities: no edema; distal pulses intact.",
    "Skin: warm and dry, no rashes.",
];

const PROBLEM_PLANS: &[&str] = &[
    "stable; continue current management and reassess at the next visit.",
    "discussed diet, regular exercise, and weight management.",
    "will obtain laboratory studies and adjust therapy based on the results.",
    "improving; no change to treatment today.",
];

const GENERIC_PLANS: &[&str] = &[
    "Medication list reviewed and reconciled with the patient.",
    "Return to clinic in 3 months, or sooner if symptoms worsen.",
    "The patient verbalized understanding of and agreement with the plan.",
    "Age-appropriate screening discussed; influenza vaccine offered.",
    "Printed after-visit summary provided.",
];

const HOSPITAL_COURSE: &[&str] = &[
    "The patient was admitted for further evaluation and management.",
    "Intravenous fluids were given and electrolytes were monitored daily.",
    "Symptoms improved steadily with treatment.",
    "Physical therapy evaluated the patient and cleared them for discharge home.",
    "The patient tolerated a regular diet before discharge.",
    "Vital signs remained stable throughout the stay.",
    "Telemetry showed no arrhythmias.",
];

const FOLLOW_UP: &[&str] = &[
    "Follow up with primary care within 7 days.",
    "Return to the emergency department for chest pain, shortness of breath, or fever above 38.5 C.",
    "Repeat basic metabolic panel in one week.",
    "Continue home medications as listed unless told otherwise.",
];

/// Up to `k` distinct sentences of `pool`, in pool order.
fn some(r: &mut SplitMix64, pool: &[&str], lo: u64, hi: u64) -> Vec<String> {
    let k = r.range(lo, hi).min(pool.len() as u64);
    let mut chosen: Vec<usize> = Vec::new();
    while (chosen.len() as u64) < k {
        let i = r.below(pool.len() as u64) as usize;
        if !chosen.contains(&i) {
            chosen.push(i);
        }
    }
    chosen.sort_unstable();
    chosen.into_iter().map(|i| pool[i].to_string()).collect()
}

fn section(heading: &str, paragraphs: Vec<String>, items: Vec<String>) -> Section {
    Section {
        heading: heading.to_string(),
        paragraphs,
        items,
    }
}

fn or_none(items: &[String], none: &str) -> Vec<String> {
    if items.is_empty() {
        vec![none.to_string()]
    } else {
        items.to_vec()
    }
}

/// A clinical note (progress note, H&P or discharge summary) for these facts.
pub(super) fn clinical_note(f: &NoteFacts<'_>, r: &mut SplitMix64) -> Note {
    let complaint = *r.pick(COMPLAINTS);
    let mut hpi = vec![format!(
        "The patient is a {}-year-old {} who presents for {complaint}.",
        f.age, f.sex
    )];
    hpi.extend(some(r, HPI, 2, 5));
    let mut plans: Vec<String> = f
        .problems
        .iter()
        .map(|p| format!("{p}: {}", r.pick(PROBLEM_PLANS)))
        .collect();
    plans.extend(some(r, GENERIC_PLANS, 2, 3));
    let problems = or_none(f.problems, "No active problems on file.");
    let medications = or_none(f.medications, "No current outpatient medications.");
    let sections = match f.code {
        // Discharge summary
        "18842-5" => vec![
            section("Reason for Admission", vec![hpi.remove(0)], vec![]),
            section("Hospital Course", some(r, HOSPITAL_COURSE, 3, 6), vec![]),
            section("Discharge Diagnoses", vec![], problems),
            section("Discharge Medications", vec![], medications),
            section("Follow-up", vec![], some(r, FOLLOW_UP, 2, 4)),
        ],
        // History and physical
        "34117-2" => vec![
            section("Chief Complaint", vec![capitalise(complaint)], vec![]),
            section("History of Present Illness", vec![hpi.join(" ")], vec![]),
            section("Past Medical History", vec![], problems),
            section("Medications", vec![], medications),
            section("Physical Exam", vec![], some(r, EXAM, 4, 8)),
            section("Assessment and Plan", vec![], plans),
        ],
        // Progress note and anything else
        _ => vec![
            section("Chief Complaint", vec![capitalise(complaint)], vec![]),
            section("History of Present Illness", vec![hpi.join(" ")], vec![]),
            section("Review of Systems", vec![], some(r, ROS, 3, 6)),
            section("Physical Exam", vec![], some(r, EXAM, 3, 6)),
            section("Assessment and Plan", vec![], plans),
        ],
    };
    Note {
        title: f.title.to_string(),
        header: f.header(),
        sections,
        footer: format!("Electronically signed by {} on {}", f.author, f.when),
    }
}

/// The cover text of a scanned document.
pub(super) fn scanned_note(f: &NoteFacts<'_>, pages: u64) -> Note {
    Note {
        title: f.title.to_string(),
        header: f.header(),
        sections: vec![section(
            "Scanned Document",
            vec![
                format!("{pages} page(s) scanned from paper and indexed to the patient's chart."),
                "A reduced image of the first page is shown; refer to the original for signatures."
                    .into(),
            ],
            vec![],
        )],
        footer: format!("Scanned on {} by Health Information Management", f.when),
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(first) => first.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

// ---------- rendering ----------

/// The note as an HTML document (the shape of Epic's HTML note rendering, simplified).
pub(super) fn html(note: &Note) -> String {
    let mut out = String::with_capacity(4096);
    let title = crate::text::escape_html(&note.title);
    out.push_str("<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n");
    out.push_str(&format!("<title>{title}</title>\n</head>\n<body>\n"));
    out.push_str(&format!("<h1>{title}</h1>\n<table class=\"header\">\n"));
    for (k, v) in &note.header {
        out.push_str(&format!(
            "<tr><th>{}</th><td>{}</td></tr>\n",
            crate::text::escape_html(k),
            crate::text::escape_html(v)
        ));
    }
    out.push_str("</table>\n");
    for s in &note.sections {
        out.push_str(&format!(
            "<h2>{}</h2>\n",
            crate::text::escape_html(&s.heading)
        ));
        for p in &s.paragraphs {
            out.push_str(&format!("<p>{}</p>\n", crate::text::escape_html(p)));
        }
        if !s.items.is_empty() {
            out.push_str("<ul>\n");
            for i in &s.items {
                out.push_str(&format!("<li>{}</li>\n", crate::text::escape_html(i)));
            }
            out.push_str("</ul>\n");
        }
    }
    out.push_str(&format!(
        "<p class=\"signature\">{}</p>\n</body>\n</html>\n",
        crate::text::escape_html(&note.footer)
    ));
    out
}

fn rtf_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' | '{' | '}' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_ascii() => out.push(c),
            c => {
                // RTF \uN takes a signed 16-bit value; '?' is the fallback character.
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{}?", *unit as i16));
                }
            }
        }
    }
    out
}

/// The same note as RTF (`{\rtf1 ...}`).
pub(super) fn rtf(note: &Note) -> String {
    let mut out = String::with_capacity(4096);
    out.push_str(
        "{\\rtf1\\ansi\\ansicpg1252\\deff0\\uc1{\\fonttbl{\\f0\\fswiss\\fcharset0 Arial;}}\n",
    );
    out.push_str("\\viewkind4\\pard\\f0\\fs20\n");
    out.push_str(&format!(
        "{{\\b\\fs28 {}}}\\par\n\\par\n",
        rtf_escape(&note.title)
    ));
    for (k, v) in &note.header {
        out.push_str(&format!(
            "{{\\b {}:}} {}\\par\n",
            rtf_escape(k),
            rtf_escape(v)
        ));
    }
    for s in &note.sections {
        out.push_str(&format!("\\par\n{{\\b {}}}\\par\n", rtf_escape(&s.heading)));
        for p in &s.paragraphs {
            out.push_str(&format!("{}\\par\n", rtf_escape(p)));
        }
        for i in &s.items {
            out.push_str(&format!("\\bullet  {}\\par\n", rtf_escape(i)));
        }
    }
    out.push_str(&format!(
        "\\par\n{{\\i {}}}\\par\n}}",
        rtf_escape(&note.footer)
    ));
    out
}

/// Wraps text at `width` characters (on spaces).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

fn pdf_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' | '(' | ')' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_ascii() && !c.is_ascii_control() => out.push(c),
            _ => out.push('?'),
        }
    }
    out
}

/// Lines per PDF page.
const PDF_LINES: usize = 40;

/// The note as a PDF 1.4 file: Helvetica text (several pages if needed) and, on the first
/// page, a `filler`-byte greyscale image drawn from `r` (a scan, or a letterhead logo).
pub(super) fn pdf(note: &Note, filler: usize, r: &mut SplitMix64) -> Vec<u8> {
    // (font size, text) per line.
    let mut lines: Vec<(u32, String)> = vec![(16, note.title.clone()), (10, String::new())];
    for (k, v) in &note.header {
        lines.push((10, format!("{k}: {v}")));
    }
    for s in &note.sections {
        lines.push((10, String::new()));
        lines.push((12, s.heading.clone()));
        for p in &s.paragraphs {
            lines.extend(wrap(p, 95).into_iter().map(|l| (10, l)));
        }
        for i in &s.items {
            for (k, l) in wrap(i, 90).into_iter().enumerate() {
                lines.push((
                    10,
                    if k == 0 {
                        format!("- {l}")
                    } else {
                        format!("  {l}")
                    },
                ));
            }
        }
    }
    lines.push((10, String::new()));
    lines.push((10, note.footer.clone()));
    let pages: Vec<&[(u32, String)]> = lines.chunks(PDF_LINES).collect();

    let width = 200usize;
    let height = filler.div_ceil(width).max(1);
    let mut image = Vec::with_capacity(width * height);
    while image.len() < width * height {
        image.extend_from_slice(&r.next_u64().to_le_bytes());
    }
    image.truncate(width * height);

    // Objects: 1 catalog, 2 page tree, 3 font, 4 image, 5 info, then (page, contents) pairs.
    let first_page = 6;
    let kids: Vec<String> = (0..pages.len())
        .map(|i| format!("{} 0 R", first_page + 2 * i))
        .collect();
    let mut objects: Vec<Vec<u8>> = vec![
        b"<< /Type /Catalog /Pages 2 0 R >>".to_vec(),
        format!(
            "<< /Type /Pages /Kids [{}] /Count {} >>",
            kids.join(" "),
            pages.len()
        )
        .into_bytes(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>"
            .to_vec(),
        {
            let mut o = format!(
                "<< /Type /XObject /Subtype /Image /Width {width} /Height {height} /ColorSpace /DeviceGray /BitsPerComponent 8 /Length {} >>\nstream\n",
                image.len()
            )
            .into_bytes();
            o.extend_from_slice(&image);
            o.extend_from_slice(b"\nendstream");
            o
        },
        format!(
            "<< /Title ({}) /Producer (epic-export sandbox) >>",
            pdf_escape(&note.title)
        )
        .into_bytes(),
    ];
    for (i, page) in pages.iter().enumerate() {
        let mut content = String::new();
        if i == 0 {
            // The image in the top right corner, 144 points wide.
            let h = (144 * height / width).max(1);
            content.push_str(&format!("q 144 0 0 {h} 420 {} cm /Im1 Do Q\n", 760 - h));
        }
        content.push_str("BT 72 740 Td\n");
        for (size, text) in page.iter() {
            content.push_str(&format!(
                "/F1 {size} Tf ({}) Tj 0 -{} Td\n",
                pdf_escape(text),
                size + 4
            ));
        }
        content.push_str("ET");
        objects.push(
            format!(
                "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> /XObject << /Im1 4 0 R >> >> /Contents {} 0 R >>",
                first_page + 2 * i + 1
            )
            .into_bytes(),
        );
        objects.push(
            format!(
                "<< /Length {} >>\nstream\n{content}\nendstream",
                content.len()
            )
            .into_bytes(),
        );
    }

    let mut out: Vec<u8> = Vec::with_capacity(filler + 8192);
    out.extend_from_slice(b"%PDF-1.4\n%\xE2\xE3\xCF\xD3\n");
    let mut offsets = Vec::with_capacity(objects.len());
    for (i, body) in objects.iter().enumerate() {
        offsets.push(out.len());
        out.extend_from_slice(format!("{} 0 obj\n", i + 1).as_bytes());
        out.extend_from_slice(body);
        out.extend_from_slice(b"\nendobj\n");
    }
    let xref = out.len();
    out.extend_from_slice(
        format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).as_bytes(),
    );
    for off in offsets {
        out.extend_from_slice(format!("{off:010} 00000 n \n").as_bytes());
    }
    out.extend_from_slice(
        format!(
            "trailer\n<< /Size {} /Root 1 0 R /Info 5 0 R >>\nstartxref\n{xref}\n%%EOF",
            objects.len() + 1
        )
        .as_bytes(),
    );
    out
}

/// A clinical note served as HTML (default) and RTF.
pub(super) fn note_doc(id: &str, note: &Note) -> BinaryDoc {
    BinaryDoc::new(
        id,
        vec![
            (HTML, html(note).into_bytes()),
            (RTF, rtf(note).into_bytes()),
        ],
    )
}

/// A document served as PDF only.
pub(super) fn pdf_doc(id: &str, note: &Note, filler: usize, r: &mut SplitMix64) -> BinaryDoc {
    BinaryDoc::new(id, vec![(PDF, pdf(note, filler, r))])
}

/// A document served as HTML only.
pub(super) fn html_doc(id: &str, note: &Note) -> BinaryDoc {
    BinaryDoc::new(id, vec![(HTML, html(note).into_bytes())])
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn sandbox_binary_ids_round_trip_and_reject_others() {
        for (patient, source, n) in [
            (0, Source::Document, 0),
            (9_999, Source::Report, 23),
            (123, Source::Document, 3),
        ] {
            let id = binary_id(42, patient, source, n);
            assert_eq!(id.len(), ID_LEN);
            assert!(id.starts_with('e') && id.ends_with('3'), "{id}");
            assert_eq!(decode_binary_id(42, &id), Some((patient, source, n)));
            // Another seed does not know it; a changed character breaks the check.
            assert_eq!(decode_binary_id(43, &id), None);
            let mut bad = id.clone().into_bytes();
            bad[30] = if bad[30] == b'A' { b'B' } else { b'A' };
            assert_eq!(decode_binary_id(42, &String::from_utf8(bad).unwrap()), None);
        }
        assert_ne!(
            binary_id(42, 1, Source::Document, 0),
            binary_id(42, 1, Source::Report, 0)
        );
        assert_eq!(decode_binary_id(42, "nope"), None);
    }

    #[test]
    fn sandbox_pdf_is_well_formed() {
        let note = Note {
            title: "Consent (signed)".into(),
            header: vec![("Patient".into(), "A \\ B".into())],
            sections: vec![section("S", vec!["x ".repeat(300)], vec!["item".into()])],
            footer: "end".into(),
        };
        let bytes = pdf(&note, 10_000, &mut SplitMix64::new(1));
        assert!(bytes.starts_with(b"%PDF-1.4\n"));
        assert!(bytes.ends_with(b"%%EOF"));
        assert!(bytes.len() > 10_000);
        // startxref points at the xref table.
        let text = String::from_utf8_lossy(&bytes);
        let start: usize = text
            .rsplit("startxref\n")
            .next()
            .and_then(|t| t.lines().next())
            .and_then(|n| n.parse().ok())
            .expect("startxref");
        assert!(bytes[start..].starts_with(b"xref\n"));
    }
}
