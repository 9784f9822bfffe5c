//! The two CSV files the original tool used, still accepted as they are:
//! the roster (`epic_sandbox_roster.csv`: a header row and the FHIR id in a column named `patient_id`,
//! `fhir_id` or `id`) and the resource list (`epic_sandbox_resources.csv`: header
//! `resource_type[,search_params]`, params as a query string such as `category=laboratory`).
//! Errors give the file and line. Other roster columns (names, MRNs) are read past and never kept.

use std::path::Path;

use super::ConfigError;
use crate::plan::Search;

const ID_COLUMNS: [&str; 3] = ["patient_id", "fhir_id", "id"];

/// A CSV file read into memory (rosters and resource lists are small), so errors can give the real line
/// number (the csv crate does not count the blank lines it skips).
struct CsvFile {
    bytes: Vec<u8>,
}

impl CsvFile {
    fn read(path: &Path) -> Result<CsvFile, ConfigError> {
        let bytes = std::fs::read(path).map_err(|e| ConfigError::File {
            path: path.to_owned(),
            message: format!("cannot read it: {e}"),
        })?;
        Ok(CsvFile { bytes })
    }

    /// The header row (the first line that is not a comment).
    fn headers(&self, path: &Path) -> Result<csv::StringRecord, ConfigError> {
        self.reader()
            .headers()
            .cloned()
            .map_err(|e| csv_err(path, self, e))
    }

    fn reader(&self) -> csv::Reader<&[u8]> {
        csv::ReaderBuilder::new()
            .trim(csv::Trim::All)
            .flexible(true)
            .comment(Some(b'#'))
            .from_reader(&self.bytes[..])
    }

    fn line_of(&self, pos: Option<&csv::Position>) -> u64 {
        let Some(pos) = pos else { return 0 };
        let mut end = (pos.byte() as usize).min(self.bytes.len());
        // A record's position can be the start of the blank lines skipped before it.
        while end < self.bytes.len() && matches!(self.bytes[end], b'\n' | b'\r') {
            end += 1;
        }
        1 + self.bytes[..end].iter().filter(|&&b| b == b'\n').count() as u64
    }
}

fn csv_err(path: &Path, file: &CsvFile, e: csv::Error) -> ConfigError {
    let line = file.line_of(e.position());
    let message = match e.kind() {
        csv::ErrorKind::Utf8 { .. } => "is not valid UTF-8; save the file as UTF-8 CSV".to_string(),
        _ => format!("malformed CSV: {e}"),
    };
    ConfigError::Csv {
        path: path.to_owned(),
        line,
        message,
    }
}

/// Reads the patient FHIR ids from a roster CSV, in file order, without duplicates.
pub fn read_roster(path: &Path) -> Result<Vec<String>, ConfigError> {
    let file = CsvFile::read(path)?;
    let headers = file.headers(path)?;
    let mut reader = file.reader();
    let column = headers
        .iter()
        .position(|h| {
            ID_COLUMNS
                .iter()
                .any(|c| h.trim_start_matches('\u{feff}').eq_ignore_ascii_case(c))
        })
        .ok_or_else(|| ConfigError::Csv {
            path: path.to_owned(),
            line: 1,
            message: format!(
                "no patient id column: the header row must name one of {} ({})",
                ID_COLUMNS.join(", "),
                describe_header(&headers)
            ),
        })?;
    let mut ids = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for record in reader.records() {
        let record = record.map_err(|e| csv_err(path, &file, e))?;
        let line = file.line_of(record.position());
        if record.iter().all(str::is_empty) {
            continue;
        }
        let id = record.get(column).unwrap_or("");
        check_id(id).map_err(|problem| ConfigError::Csv {
            path: path.to_owned(),
            line,
            message: problem.to_string(),
        })?;
        if seen.insert(id.to_owned()) {
            ids.push(id.to_owned());
        } else {
            tracing::warn!(file = %path.display(), line, "roster lists a patient twice; exporting it once");
        }
    }
    if ids.is_empty() {
        return Err(ConfigError::File {
            path: path.to_owned(),
            message: "the roster lists no patients".into(),
        });
    }
    Ok(ids)
}

/// What is wrong with a patient id (never quoting it: it may be an MRN or a name put there by mistake).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdProblem {
    #[error("the patient id is empty")]
    Empty,
    #[error(
        "the patient id is not a FHIR id (letters, digits, '-', '.' only); put the patient's FHIR id, not an MRN or name, in this column"
    )]
    NotFhirId,
}

/// What is wrong with an inline list of patient ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PatientListProblem {
    #[error("entry {index}: {problem}")]
    Entry { index: usize, problem: IdProblem },
    #[error("lists no patients")]
    Empty,
}

/// Validates inline patient ids.
pub fn check_patient_ids(ids: Vec<String>) -> Result<Vec<String>, PatientListProblem> {
    let mut out: Vec<String> = Vec::with_capacity(ids.len());
    for (index, id) in ids.into_iter().enumerate() {
        let id = id.trim().to_owned();
        check_id(&id).map_err(|problem| PatientListProblem::Entry { index, problem })?;
        if !out.contains(&id) {
            out.push(id);
        }
    }
    if out.is_empty() {
        return Err(PatientListProblem::Empty);
    }
    Ok(out)
}

/// What the first line of a roster without an id column holds, for the error: its column names when
/// they look like column names, otherwise only how many fields it has, since a roster without a
/// header row starts with a patient (ids and names must not reach logs or e-mail).
fn describe_header(headers: &csv::StringRecord) -> String {
    let looks_like_names = headers.iter().all(|h| {
        let h = h.trim_start_matches('\u{feff}').trim();
        h.len() <= 40
            && h.chars()
                .all(|c| c.is_ascii_alphabetic() || matches!(c, ' ' | '_' | '-'))
    });
    if looks_like_names {
        format!(
            "found the columns {}",
            headers
                .iter()
                .map(|h| h.trim_start_matches('\u{feff}').trim())
                .collect::<Vec<_>>()
                .join(", ")
        )
    } else {
        format!(
            "the first line, with {} fields, does not look like a header row: it may be a patient, so it is not shown; add a header row such as patient_id",
            headers.len()
        )
    }
}

/// A FHIR id: letters, digits, '-' and '.', 1-64 characters (Epic's ids are longer than R4 allows, so up to 200).
fn check_id(id: &str) -> Result<(), IdProblem> {
    if id.is_empty() {
        return Err(IdProblem::Empty);
    }
    if id.len() > 200
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
    {
        return Err(IdProblem::NotFhirId);
    }
    Ok(())
}

/// Reads the resource list CSV into searches.
pub fn read_resources(path: &Path) -> Result<Vec<Search>, ConfigError> {
    let file = CsvFile::read(path)?;
    let headers = file.headers(path)?;
    let mut reader = file.reader();
    let col = |name: &str| {
        headers
            .iter()
            .position(|h| h.trim_start_matches('\u{feff}').eq_ignore_ascii_case(name))
    };
    let type_col = col("resource_type").ok_or_else(|| ConfigError::Csv {
        path: path.to_owned(),
        line: 1,
        message: "the header row must be `resource_type,search_params` (search_params optional)"
            .into(),
    })?;
    let params_col = col("search_params");
    let mut out: Vec<Search> = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| csv_err(path, &file, e))?;
        let line = file.line_of(record.position());
        if record.iter().all(str::is_empty) {
            continue;
        }
        let rtype = record.get(type_col).unwrap_or("").to_owned();
        let query = params_col
            .and_then(|c| record.get(c))
            .unwrap_or("")
            .trim_start_matches('?');
        if let Some(bad) = query
            .split('&')
            .find(|seg| !seg.is_empty() && !seg.contains('='))
        {
            return Err(ConfigError::Csv {
                path: path.to_owned(),
                line,
                message: format!(
                    "search parameter {bad:?} has no value; write search_params as a query string such as category=laboratory"
                ),
            });
        }
        let params: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let search = Search::new(rtype, params).map_err(|problem| ConfigError::Csv {
            path: path.to_owned(),
            line,
            message: problem.to_string(),
        })?;
        if out.contains(&search) {
            tracing::warn!(file = %path.display(), line, "resource list repeats {}; running it once", search.label());
            continue;
        }
        out.push(search);
    }
    if out.is_empty() {
        return Err(ConfigError::File {
            path: path.to_owned(),
            message: "lists no resources".into(),
        });
    }
    Ok(out)
}
