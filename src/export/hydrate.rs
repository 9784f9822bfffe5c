//! Hydration: the resources that exported resources reference but that are not in the export (the
//! `Medication` a `MedicationRequest` names, the `Practitioner`, `Organization` and `Location` of
//! an encounter), fetched once each and written like any other type.
//!
//! Round one takes what the writer saw of the run's resources (`Scan`): the references of the `hydrate` types to this
//! server that no file holds; they are fetched with batched `_id` searches, and by reads where the
//! server refuses those (or leaves an id out). Each further round does the same for what the last
//! round brought in (a `PractitionerRole`'s `Organization`), up to `MAX_ROUNDS`. Contained
//! references and references to other servers are left as they are.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use futures::StreamExt;
use serde_json::json;
use tokio::sync::mpsc;

use super::StepError;
use super::writer::WriterMsg;
use crate::fhir::bundle::{self, push_compact_line};
use crate::fhir::reference::{self, Reference};
use crate::fhir::runlog::EventKind;
use crate::fhir::{FetchError, FhirClient};
use crate::summary::HydrationStats;

/// Rounds of hydration at most: the export's references, then what those bring in, twice.
pub const MAX_ROUNDS: u32 = 3;
/// Ids per `_id` search (also bounded by `MAX_QUERY_BYTES`).
const BATCH_IDS: usize = 50;
const MAX_QUERY_BYTES: usize = 1800;
/// Pages of one `_id` search at most.
const MAX_PAGES: usize = 100;
/// Bytes of fetched resources held before they go to the writer.
const DELIVERY_BYTES: usize = 1 << 20;

/// What the run's resources hold: ids of the hydrated types, and references to them. Filled as
/// retrieval writes them (the writer's observer), so nothing is read back.
pub struct Scan {
    types: Vec<String>,
    base: String,
    have: HashSet<Reference>,
    wanted: BTreeSet<Reference>,
}

impl Scan {
    pub fn new(types: &[String], base: &str) -> Scan {
        Scan {
            types: types.to_vec(),
            base: base.to_owned(),
            have: HashSet::new(),
            wanted: BTreeSet::new(),
        }
    }

    /// Notes what `lines` (complete NDJSON lines of `file_type`) hold and reference.
    pub fn add(&mut self, file_type: &str, lines: &[u8]) {
        let holds_wanted_type = self.types.iter().any(|t| t == file_type);
        for line in lines.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            if holds_wanted_type
                && let Ok(raw) = serde_json::from_slice::<&serde_json::value::RawValue>(line)
                && let Ok(head) = bundle::head(raw)
                && let Some(id) = head.id
            {
                self.have.insert(Reference {
                    resource_type: head.resource_type.into_owned(),
                    id: id.into_owned(),
                });
            }
            collect(line, &self.types, &self.base, &mut self.wanted);
        }
    }
}

/// Adds the references of `types` in `json` to `into`.
fn collect(json: &[u8], types: &[String], base: &str, into: &mut BTreeSet<Reference>) {
    // Lines were validated when written; one that is not JSON has no references to follow.
    let _ = reference::scan(json, &mut |r| {
        if let Some(r) = reference::local(r, base)
            && types.contains(&r.resource_type)
        {
            into.insert(r);
        }
    });
}

pub struct Hydrator<'a> {
    client: &'a FhirClient,
    base: &'a str,
    types: &'a [String],
    concurrency: usize,
    tx: &'a mpsc::Sender<WriterMsg>,
    /// Types whose server refused an `_id` search: read one by one.
    reads_only: HashSet<String>,
    stats: HydrationStats,
}

/// One fetched resource: its reference and its compact line.
struct Fetched {
    reference: Reference,
    line: Vec<u8>,
}

/// A round's fetched resources on their way to the writer, sent every `DELIVERY_BYTES` so that a
/// round is never held whole, and the references they hold (the next round's).
#[derive(Default)]
struct Delivery {
    by_type: BTreeMap<String, (Vec<u8>, u64)>,
    bytes: usize,
    references: BTreeSet<Reference>,
}

impl<'a> Hydrator<'a> {
    pub fn new(
        client: &'a FhirClient,
        base: &'a str,
        types: &'a [String],
        concurrency: usize,
        tx: &'a mpsc::Sender<WriterMsg>,
    ) -> Self {
        Hydrator {
            client,
            base,
            types,
            concurrency: concurrency.max(1),
            tx,
            reads_only: HashSet::new(),
            stats: HydrationStats::default(),
        }
    }

    /// Hydrates what the exported resources (seen by `scan`) reference; returns the figures.
    pub async fn run(mut self, scan: Scan) -> Result<HydrationStats, StepError> {
        let mut have = scan.have;
        let mut wanted = scan.wanted;
        for round in 1..=MAX_ROUNDS {
            let missing: Vec<Reference> =
                wanted.into_iter().filter(|r| !have.contains(r)).collect();
            if missing.is_empty() {
                break;
            }
            self.stats.rounds = round;
            tracing::info!(
                round,
                references = missing.len(),
                "hydrating referenced resources"
            );
            // Whatever happens to them, these are not asked for again.
            have.extend(missing.iter().cloned());
            let mut delivery = Delivery::default();
            self.fetch_all(missing, &mut delivery).await?;
            self.flush(&mut delivery).await?;
            wanted = delivery.references;
        }
        Ok(self.stats)
    }

    /// Hands a fetched resource on: its references to the next round, its line to the writer.
    async fn deliver(&mut self, f: Fetched, out: &mut Delivery) -> Result<(), StepError> {
        collect(&f.line, self.types, self.base, &mut out.references);
        let batch = out.by_type.entry(f.reference.resource_type).or_default();
        batch.0.extend_from_slice(&f.line);
        batch.1 += 1;
        out.bytes += f.line.len();
        if out.bytes >= DELIVERY_BYTES {
            self.flush(out).await?;
        }
        Ok(())
    }

    async fn flush(&mut self, out: &mut Delivery) -> Result<(), StepError> {
        for (t, (lines, count)) in std::mem::take(&mut out.by_type) {
            *self.stats.fetched.entry(t.clone()).or_default() += count;
            self.tx
                .send(WriterMsg::Resources {
                    resource_type: t,
                    lines,
                    count,
                })
                .await
                .map_err(|_| StepError::WriterGone)?;
        }
        out.bytes = 0;
        Ok(())
    }

    /// Fetches `missing` (sorted by type): `_id` searches per type, reads for the rest.
    async fn fetch_all(
        &mut self,
        missing: Vec<Reference>,
        out: &mut Delivery,
    ) -> Result<(), StepError> {
        let mut by_type: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for r in missing {
            by_type.entry(r.resource_type).or_default().push(r.id);
        }
        let mut to_read: Vec<Reference> = Vec::new();
        for (t, ids) in by_type {
            let mut left: BTreeSet<String> = ids.iter().cloned().collect();
            for batch in batches(&ids) {
                if self.reads_only.contains(&t) {
                    break;
                }
                match self.search(&t, &batch).await {
                    Ok(found) => {
                        for f in found {
                            if left.remove(&f.reference.id) {
                                self.deliver(f, out).await?;
                            }
                        }
                    }
                    Err(e) if e.is_fatal() => return Err(StepError::Fetch(e)),
                    Err(e) => {
                        tracing::info!(
                            "the server did not answer a {t} search by _id ({}); reading each {t} instead",
                            e.brief()
                        );
                        self.reads_only.insert(t.clone());
                    }
                }
            }
            to_read.extend(left.into_iter().map(|id| Reference {
                resource_type: t.clone(),
                id,
            }));
        }
        let client = self.client;
        let mut reads = futures::stream::iter(to_read.into_iter().map(|r| async move {
            let url = client.url(&format!("{}/{}", r.resource_type, r.id));
            let result = client.get_as(EventKind::Hydrate, &url).await;
            (r, result)
        }))
        .buffer_unordered(self.concurrency);
        while let Some((r, result)) = reads.next().await {
            let failure = match result {
                Ok(body) => match one_resource(&body, &r) {
                    Some(line) => {
                        self.deliver(Fetched { reference: r, line }, out).await?;
                        continue;
                    }
                    None => (
                        None,
                        Default::default(),
                        format!("the read of {r} did not return {r}"),
                    ),
                },
                Err(e) if e.is_fatal() => return Err(StepError::Fetch(e)),
                Err(e) => (e.status(), e.correlation(), e.to_string()),
            };
            self.stats.failed += 1;
            let (status, correlation, message) = failure;
            let record = json!({
                "kind": "hydrate",
                "reference": r.to_string(),
                "status": status,
                "correlation": correlation,
                "message": message,
            });
            self.tx
                .send(WriterMsg::Failure(record))
                .await
                .map_err(|_| StepError::WriterGone)?;
        }
        Ok(())
    }

    /// One `_id` search, every page: the resources of type `t` with one of `ids`.
    async fn search(&self, t: &str, ids: &[&str]) -> Result<Vec<Fetched>, FetchError> {
        let mut url = self.client.url(&format!("{t}?_id={}", ids.join(",")));
        let wanted: HashSet<&str> = ids.iter().copied().collect();
        let mut found = Vec::new();
        for _ in 0..MAX_PAGES {
            let body = self.client.get_as(EventKind::Hydrate, &url).await?;
            let page = bundle::parse_page(&body)
                .map_err(|e| FetchError::Transport(format!("the _id search answer: {e}")))?;
            for raw in &page.resources {
                let Ok(head) = bundle::head(raw) else {
                    continue;
                };
                // Only what was asked for: anything else the server adds is dropped.
                if head.resource_type != t
                    || !head.id.as_deref().is_some_and(|id| wanted.contains(id))
                {
                    continue;
                }
                let mut line = Vec::with_capacity(raw.get().len() + 1);
                push_compact_line(raw.get().as_bytes(), &mut line);
                found.push(Fetched {
                    reference: Reference {
                        resource_type: t.to_owned(),
                        id: head.id.unwrap_or_default().into_owned(),
                    },
                    line,
                });
            }
            match page
                .next
                .and_then(|n| url::Url::parse(&url).ok()?.join(&n).ok())
            {
                Some(next) if next.as_str() != url => url = next.to_string(),
                _ => return Ok(found),
            }
        }
        Ok(found)
    }
}

/// `ids` in `_id` batches: at most `BATCH_IDS` each, and a query of at most `MAX_QUERY_BYTES`.
fn batches(ids: &[String]) -> Vec<Vec<&str>> {
    let mut out: Vec<Vec<&str>> = Vec::new();
    let mut len = 0;
    for id in ids {
        match out.last_mut() {
            Some(b) if b.len() < BATCH_IDS && len + id.len() < MAX_QUERY_BYTES => {
                b.push(id);
                len += id.len() + 1;
            }
            _ => {
                out.push(vec![id]);
                len = id.len();
            }
        }
    }
    out
}

/// The compact line of a read's answer, if it is the resource asked for.
fn one_resource(body: &[u8], r: &Reference) -> Option<Vec<u8>> {
    let raw: &serde_json::value::RawValue = serde_json::from_slice(body).ok()?;
    let head = bundle::head(raw).ok()?;
    if head.resource_type != r.resource_type || head.id.as_deref() != Some(r.id.as_str()) {
        return None;
    }
    let mut line = Vec::with_capacity(raw.get().len() + 1);
    push_compact_line(raw.get().as_bytes(), &mut line);
    Some(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_bounded_by_count_and_length() {
        let ids: Vec<String> = (0..120).map(|i| format!("id{i}")).collect();
        let b = batches(&ids);
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), [50, 50, 20]);
        let long: Vec<String> = (0..5).map(|i| format!("{i}{}", "x".repeat(63))).collect();
        let b = batches(&long);
        assert!(
            b.iter()
                .all(|b| b.iter().map(|i| i.len() + 1).sum::<usize>() <= MAX_QUERY_BYTES)
        );
        assert_eq!(b.iter().map(Vec::len).sum::<usize>(), 5);
        assert!(batches(&[]).is_empty());
    }

    #[test]
    fn a_read_must_return_what_was_asked() {
        let r = Reference {
            resource_type: "Medication".into(),
            id: "m1".into(),
        };
        assert!(one_resource(br#"{"resourceType":"Medication","id":"m1"}"#, &r).is_some());
        assert!(one_resource(br#"{"resourceType":"Medication","id":"m2"}"#, &r).is_none());
        assert!(one_resource(br#"{"resourceType":"Patient","id":"m1"}"#, &r).is_none());
        assert!(one_resource(b"nope", &r).is_none());
    }
}
