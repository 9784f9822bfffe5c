//! Tests of the sandbox's clinical-note attachments and shared catalogue over real sockets:
//! the data shapes (`data.rs`, `catalogue.rs`, `documents.rs`), `GET Binary/{id}` content
//! negotiation, catalogue reads and `_id` searches (`fhir.rs`), and attachments served from the
//! storage origin (`binary.rs`).

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine;

use super::*;

/// Every Binary id in a resource's attachment URLs (`Binary/{id}` or `{base}/{id}`).
fn attachment_urls(resource: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for c in resource["content"].as_array().into_iter().flatten() {
        let a = &c["attachment"];
        out.push((
            a["url"].as_str().unwrap_or_default().to_string(),
            a["contentType"].as_str().unwrap_or_default().to_string(),
        ));
    }
    for f in resource["presentedForm"].as_array().into_iter().flatten() {
        out.push((
            f["url"].as_str().unwrap_or_default().to_string(),
            f["contentType"].as_str().unwrap_or_default().to_string(),
        ));
    }
    out
}

fn last_segment(url: &str) -> String {
    url.rsplit('/').next().unwrap_or_default().to_string()
}

/// `Type/id` → (type, id).
fn split_reference(reference: &Value) -> (String, String) {
    let r = reference["reference"].as_str().expect("reference");
    let (t, id) = r.split_once('/').expect("Type/id");
    (t.to_string(), id.to_string())
}

/// Binary ids of each kind found among the first patients: (note, scanned PDF, PDF report,
/// HTML report).
fn sample_binaries(d: &Dataset) -> [String; 4] {
    let mut found: [Option<String>; 4] = Default::default();
    for pid in d.patient_ids() {
        for doc in d.resources("DocumentReference", &pid) {
            let urls = attachment_urls(&doc);
            let slot = if urls.len() == 2 { 0 } else { 1 };
            found[slot].get_or_insert_with(|| last_segment(&urls[0].0));
        }
        for dr in d.resources("DiagnosticReport", &pid) {
            for (url, ct) in attachment_urls(&dr) {
                let slot = if ct == "application/pdf" { 2 } else { 3 };
                found[slot].get_or_insert_with(|| last_segment(&url));
            }
        }
    }
    found.map(|f| f.expect("every kind of Binary among the sample patients"))
}

#[test]
fn attachments_documents_and_reports_look_like_epic() {
    let d = Dataset::generate(40, 42);
    let (mut notes, mut scanned, mut forms, mut reports) = (0, 0, 0, 0);
    for pid in d.patient_ids() {
        let mut referenced = Vec::new();
        for doc in d.resources("DocumentReference", &pid) {
            let urls = attachment_urls(&doc);
            match urls.as_slice() {
                [(html, t1), (rtf, t2)] => {
                    notes += 1;
                    assert_eq!((t1.as_str(), t2.as_str()), ("text/html", "text/rtf"));
                    assert_eq!(html, rtf, "both content entries name the same Binary");
                    assert!(html.starts_with("Binary/"), "{html}");
                }
                [(pdf, t)] => {
                    scanned += 1;
                    assert_eq!(t, "application/pdf");
                    assert!(pdf.starts_with("Binary/"), "{pdf}");
                }
                other => panic!("unexpected content {other:?}"),
            }
            referenced.push(last_segment(&urls[0].0));
            let (t, id) = split_reference(&doc["author"][0]);
            assert_eq!(t, "Practitioner");
            assert!(d.catalogue_resource("Practitioner", &id).is_some());
            assert!(doc["author"][0]["display"].is_string());
            assert!(doc["type"]["text"].is_string() && doc["date"].is_string());
        }
        for (n, dr) in d.resources("DiagnosticReport", &pid).iter().enumerate() {
            reports += 1;
            let (t, id) = split_reference(&dr["performer"][0]);
            assert_eq!(t, "Organization");
            assert!(d.catalogue_resource("Organization", &id).is_some());
            let urls = attachment_urls(dr);
            assert_eq!(urls.len(), usize::from(n % 2 == 0), "every other report");
            for (url, ct) in urls {
                forms += 1;
                assert!(url.starts_with("Binary/"));
                assert!(["application/pdf", "text/html"].contains(&ct.as_str()));
                assert!(dr["presentedForm"][0]["title"].is_string());
                referenced.push(last_segment(&url));
            }
        }
        assert_eq!(d.binary_ids(&pid), referenced, "binary_ids of {pid}");
        for id in &referenced {
            let doc = d.binary(id).expect("referenced Binary exists");
            assert_eq!(&doc.id, id);
            for ct in doc.content_types.clone() {
                let bytes = doc.bytes(ct).expect("bytes");
                match ct {
                    "text/html" => {
                        let text = String::from_utf8(bytes).expect("utf-8");
                        assert!(text.starts_with("<!DOCTYPE html>"));
                        assert!(text.trim_end().ends_with("</html>"));
                        assert!((500..=4500).contains(&text.len()), "{}", text.len());
                    }
                    "text/rtf" => {
                        let text = String::from_utf8(bytes).expect("ascii");
                        assert!(text.starts_with("{\\rtf1"));
                        assert!(text.ends_with('}'));
                    }
                    "application/pdf" => {
                        assert!(bytes.starts_with(b"%PDF-1.4"));
                        assert!(bytes.ends_with(b"%%EOF"));
                        assert!((5_000..=40_000).contains(&bytes.len()), "{}", bytes.len());
                    }
                    other => panic!("unexpected content type {other}"),
                }
            }
            // Parameters and case do not matter when asking for bytes.
            let default = doc.default_content_type();
            assert_eq!(
                doc.bytes(&format!("{}; charset=utf-8", default.to_uppercase())),
                doc.bytes(default)
            );
            assert_eq!(doc.bytes("image/png"), None);
        }
    }
    assert!(notes > 0 && scanned > 0 && forms > 0);
    let share = scanned as f64 / (notes + scanned) as f64;
    assert!((0.08..=0.35).contains(&share), "scanned share {share}");
    assert!(forms * 2 >= reports && forms * 2 <= reports + 40);
    // Ids that are not ours, or not referenced, have no content.
    assert!(d.binary("nope").is_none());
    let other = Dataset::generate(40, 43);
    let [note, ..] = sample_binaries(&d);
    assert!(other.binary(&note).is_none());
    assert!(Dataset::generate(0, 42).binary(&note).is_none());
}

#[test]
fn attachments_are_deterministic_per_seed() {
    let (a, b) = (Dataset::generate(12, 42), Dataset::generate(12, 42));
    let mut all = 0;
    for pid in a.patient_ids() {
        assert_eq!(a.binary_ids(&pid), b.binary_ids(&pid));
        for id in a.binary_ids(&pid) {
            all += 1;
            assert_eq!(a.binary(&id), b.binary(&id), "{id}");
        }
    }
    assert!(all > 10, "{all}");
    let c = Dataset::generate(12, 43);
    assert_ne!(
        a.binary_ids(&a.patient_ids()[0]),
        c.binary_ids(&c.patient_ids()[0])
    );
    for t in CATALOGUE_TYPES {
        assert_eq!(a.catalogue(t), b.catalogue(t));
        assert_ne!(ids(&a.catalogue(t)), ids(&c.catalogue(t)));
    }
}

#[test]
fn catalogue_is_shared_and_every_reference_resolves() {
    let d = Dataset::generate(30, 42);
    let counts: BTreeMap<&str, usize> = CATALOGUE_TYPES
        .iter()
        .map(|t| (*t, d.catalogue(t).len()))
        .collect();
    assert_eq!(
        counts,
        BTreeMap::from([
            ("Location", 6),
            ("Medication", 6),
            ("Organization", 4),
            ("Practitioner", 12),
            ("PractitionerRole", 12),
        ])
    );
    let resolve = |reference: &Value| {
        let (t, id) = split_reference(reference);
        assert!(CATALOGUE_TYPES.contains(&t.as_str()), "{t}");
        d.catalogue_resource(&t, &id)
            .unwrap_or_else(|| panic!("{t}/{id} does not resolve"))
    };
    for t in CATALOGUE_TYPES {
        for r in d.catalogue(t) {
            assert_eq!(r["resourceType"], *t);
            let id = r["id"].as_str().expect("id");
            assert_eq!(d.catalogue_resource(t, id).as_ref(), Some(&r));
            // Not in the patient compartment.
            assert!(d.resources(t, &d.patient_ids()[0]).is_empty());
        }
    }
    assert_eq!(d.catalogue("Observation"), Vec::<Value>::new());
    for p in d.catalogue("Practitioner") {
        let npi = &p["identifier"][0];
        assert_eq!(npi["system"], "http://hl7.org/fhir/sid/us-npi");
        assert_eq!(npi["value"].as_str().map(str::len), Some(10));
        assert!(p["name"][0]["family"].is_string());
    }
    for role in d.catalogue("PractitionerRole") {
        assert_eq!(
            resolve(&role["practitioner"])["resourceType"],
            "Practitioner"
        );
        assert_eq!(
            resolve(&role["organization"])["resourceType"],
            "Organization"
        );
        assert_eq!(resolve(&role["location"][0])["resourceType"], "Location");
    }
    let orgs = d.catalogue("Organization");
    let parents: Vec<&Value> = orgs.iter().filter(|o| o.get("partOf").is_none()).collect();
    assert_eq!(parents.len(), 1, "one parent organization");
    for o in orgs.iter().filter(|o| o.get("partOf").is_some()) {
        assert_eq!(resolve(&o["partOf"])["id"], parents[0]["id"]);
    }
    for l in d.catalogue("Location") {
        assert_eq!(
            resolve(&l["managingOrganization"])["resourceType"],
            "Organization"
        );
    }
    // Patient resources point into the catalogue; many requests share a Medication.
    let (mut requests, mut medications) = (0, BTreeSet::new());
    for pid in d.patient_ids() {
        for mr in d.resources("MedicationRequest", &pid) {
            requests += 1;
            assert!(mr.get("medicationCodeableConcept").is_none());
            assert!(mr["medicationReference"]["display"].is_string());
            let med = resolve(&mr["medicationReference"]);
            assert_eq!(med["resourceType"], "Medication");
            assert_eq!(med["code"]["text"], mr["medicationReference"]["display"]);
            medications.insert(med["id"].as_str().unwrap_or_default().to_string());
            assert_eq!(
                resolve(&mr["requester"])["resourceType"],
                "PractitionerRole"
            );
        }
        for enc in d.resources("Encounter", &pid) {
            assert_eq!(
                resolve(&enc["participant"][0]["individual"])["resourceType"],
                "Practitioner"
            );
            assert_eq!(
                resolve(&enc["serviceProvider"])["resourceType"],
                "Organization"
            );
            assert_eq!(
                resolve(&enc["location"][0]["location"])["resourceType"],
                "Location"
            );
        }
    }
    assert!(requests > medications.len() * 2, "{requests} requests");
}

#[tokio::test]
async fn binary_reads_negotiate_like_epic() {
    let (sb, token) = started(SandboxOptions::default()).await;
    let base = sb.base_url();
    let client = reqwest::Client::new();
    let fetch = |id: String, accept: Option<&'static str>| {
        let (client, token, url) = (client.clone(), token.clone(), format!("{base}/Binary/{id}"));
        async move {
            let mut req = client.get(url).bearer_auth(token);
            if let Some(accept) = accept {
                req = req.header("Accept", accept);
            }
            let resp = req.send().await.expect("GET Binary");
            let status = resp.status().as_u16();
            let header = |name: &str| {
                resp.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string()
            };
            let (ct, len) = (header("content-type"), header("content-length"));
            let body = resp.bytes().await.expect("body").to_vec();
            (status, ct, len, body)
        }
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut raw_requests = 0;
    let mut requests = 0;
    for id in sample_binaries(sb.dataset()) {
        let doc = sb.dataset().binary(&id).expect("binary");
        // Raw: each content type by name, also with parameters, q-values and other types.
        for ct in doc.content_types.clone() {
            for accept in [
                ct,
                "application/fhir+json, TEXT/RTF;q=0.9",
                "*/*;q=0.1, application/pdf",
            ] {
                let wanted = match accept {
                    a if a == ct => Some(ct),
                    a => doc
                        .content_types
                        .iter()
                        .copied()
                        .find(|t| a.to_lowercase().contains(t)),
                };
                let Some(wanted) = wanted.filter(|t| *t == ct) else {
                    continue;
                };
                let (status, got_ct, len, body) = fetch(id.clone(), Some(accept)).await;
                requests += 1;
                raw_requests += 1;
                assert_eq!(status, 200, "{id} {accept}");
                assert_eq!(got_ct, wanted, "{accept}");
                assert_eq!(len, body.len().to_string());
                assert_eq!(Some(body), doc.bytes(wanted), "{id} as {wanted}");
            }
        }
        // FHIR Binary resource: no Accept, */* alone, FHIR JSON, JSON, an unrelated type.
        for accept in [
            None,
            Some("*/*"),
            Some("application/fhir+json"),
            Some("application/json"),
            Some("image/png"),
        ] {
            let (status, ct, _, body) = fetch(id.clone(), accept).await;
            requests += 1;
            assert_eq!(status, 200);
            assert!(ct.starts_with("application/fhir+json"), "{ct}");
            let v: Value = serde_json::from_slice(&body).expect("json");
            assert_eq!(v["resourceType"], "Binary");
            assert_eq!(v["id"], id.as_str());
            assert_eq!(v["contentType"], doc.default_content_type());
            let data = b64
                .decode(v["data"].as_str().expect("data"))
                .expect("base64");
            assert_eq!(Some(data), doc.bytes(doc.default_content_type()));
        }
    }
    // Unknown ids: 404 OperationOutcome (and still counted as Binary reads).
    let [note, ..] = sample_binaries(sb.dataset());
    let mut tampered = note.clone().into_bytes();
    tampered[20] = if tampered[20] == b'x' { b'y' } else { b'x' };
    for id in ["nope".to_string(), String::from_utf8(tampered).unwrap()] {
        let (status, _, _, body) = fetch(id, Some("text/html")).await;
        requests += 1;
        assert_eq!(status, 404);
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["resourceType"], "OperationOutcome");
    }
    // No token: 401, not a Binary read.
    let resp = reqwest::Client::new()
        .get(format!("{base}/Binary/{note}"))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status().as_u16(), 401);
    let stats = sb.stats();
    assert_eq!(stats.binary_reads, requests);
    assert_eq!(stats.binary_reads_raw, raw_requests);
    assert!(raw_requests >= 5, "{raw_requests}");

    // Same seed, another server: the same bytes.
    let (other, token2) = started(SandboxOptions::default()).await;
    let body = get(&format!("{}/Binary/{note}", other.base_url()), &token2).await;
    let v: Value = body.json().await.expect("json");
    let data = b64
        .decode(v["data"].as_str().expect("data"))
        .expect("base64");
    assert_eq!(
        Some(data),
        sb.dataset()
            .binary(&note)
            .and_then(|d| d.bytes("text/html"))
    );
    other.shutdown().await;
    sb.shutdown().await;
}

#[tokio::test]
async fn catalogue_reads_and_id_searches() {
    let (sb, token) = started(SandboxOptions {
        page_size: 4,
        ..SandboxOptions::default()
    })
    .await;
    let base = sb.base_url();
    let d = sb.dataset();
    let mut reads = BTreeMap::new();
    for t in CATALOGUE_TYPES {
        for r in d.catalogue(t) {
            let id = r["id"].as_str().expect("id");
            let (status, body) = get_json(&format!("{base}/{t}/{id}"), &token).await;
            assert_eq!((status, &body), (200, &r), "{t}/{id}");
            *reads.entry(t.to_string()).or_insert(0u64) += 1;
        }
        let (status, body) = get_json(&format!("{base}/{t}/eUnknown3"), &token).await;
        assert_eq!(status, 404);
        assert_eq!(body["resourceType"], "OperationOutcome");
        *reads.entry(t.to_string()).or_insert(0) += 1;
    }
    // A Practitioner id is not a Location.
    let practitioner = ids(&d.catalogue("Practitioner"))[0].clone();
    assert_eq!(
        get_json(&format!("{base}/Location/{practitioner}"), &token)
            .await
            .0,
        404
    );
    *reads.entry("Location".to_string()).or_insert(0) += 1;
    assert_eq!(sb.stats().reads_by_type, reads);

    // _id searches: comma lists and repeated parameters, unknown ids left out, asked order.
    let all = ids(&d.catalogue("Practitioner"));
    let wanted = vec![all[3].clone(), all[0].clone(), all[7].clone()];
    let url = format!(
        "{base}/Practitioner?_id={},unknown1,{}&_id={}&_id=unknown2",
        wanted[0], wanted[1], wanted[2]
    );
    let pages = all_pages(&url, &token).await;
    assert_eq!(pages.len(), 1);
    assert_eq!(match_ids(&pages), wanted);
    assert_eq!(pages[0]["total"], 3);
    let entry = &pages[0]["entry"][0];
    assert_eq!(
        entry["fullUrl"],
        format!("{base}/Practitioner/{}", wanted[0])
    );
    assert_eq!(
        entry["resource"],
        d.catalogue_resource("Practitioner", &wanted[0]).unwrap()
    );
    // More ids than a page: paged with sessions like other searches.
    let pages = all_pages(
        &format!("{base}/Practitioner?_id={}", all.join(",")),
        &token,
    )
    .await;
    assert!(pages.len() > 2, "{}", pages.len());
    assert_eq!(match_ids(&pages), all);
    // Nothing known: an empty Bundle.
    let (status, body) = get_json(&format!("{base}/Medication?_id=nope"), &token).await;
    assert_eq!((status, body["total"].as_u64()), (200, Some(0)));
    // The wrong type's ids are not found either.
    let (_, body) = get_json(&format!("{base}/Organization?_id={}", all[0]), &token).await;
    assert_eq!(body["total"], 0);
    // A search parameter is required; per-patient searches are not supported.
    let pid = &d.patient_ids()[0];
    for url in [
        format!("{base}/Medication"),
        format!("{base}/Location?patient={pid}"),
    ] {
        let (status, body) = get_json(&url, &token).await;
        assert_eq!(status, 400, "{url}");
        assert_eq!(body["issue"][0]["code"], "required");
    }
    assert_eq!(sb.stats().id_searches, 4);
    assert_eq!(sb.stats().id_search_ids, 5 + all.len() as u64 + 1 + 1);
    // Patient reads and Patient?_id= are unchanged and not counted here.
    assert_eq!(
        get_json(&format!("{base}/Patient/{pid}"), &token).await.0,
        200
    );
    let pages = all_pages(&format!("{base}/Patient?_id={pid}"), &token).await;
    assert_eq!(match_ids(&pages), vec![pid.clone()]);
    assert_eq!(sb.stats().id_searches, 4);
    assert_eq!(sb.stats().reads_by_type, reads);

    // The CapabilityStatement lists the catalogue types and Binary.
    let (_, cs) = get_json(&format!("{base}/metadata"), &token).await;
    let resources = cs["rest"][0]["resource"].as_array().expect("resources");
    let find = |t: &str| {
        resources
            .iter()
            .find(|r| r["type"] == t)
            .unwrap_or_else(|| panic!("{t} in metadata"))
            .clone()
    };
    for t in CATALOGUE_TYPES {
        let r = find(t);
        assert_eq!(
            r["interaction"],
            json!([{"code": "read"}, {"code": "search-type"}])
        );
        assert_eq!(r["searchParam"][0]["name"], "_id");
    }
    assert_eq!(find("Binary")["interaction"], json!([{"code": "read"}]));
    sb.shutdown().await;
}

#[tokio::test]
async fn attachments_on_storage_are_served_without_a_token() {
    let (sb, token) = started(SandboxOptions {
        attachments_on_storage: true,
        ..SandboxOptions::default()
    })
    .await;
    let storage = sb.storage_origin();
    let d = sb.dataset();
    let mut checked = 0;
    for pid in d.patient_ids() {
        // The served DocumentReferences carry the storage URLs.
        let pages = all_pages(
            &format!("{}/DocumentReference?patient={pid}", sb.base_url()),
            &token,
        )
        .await;
        let served: Vec<Value> = pages
            .iter()
            .flat_map(|p| p["entry"].as_array().cloned().unwrap_or_default())
            .filter(|e| e["search"]["mode"] == "match")
            .map(|e| e["resource"].clone())
            .collect();
        assert_eq!(served, d.resources("DocumentReference", &pid));
        for doc in &served {
            for (url, ct) in attachment_urls(doc) {
                assert!(url.starts_with(&format!("{storage}/notes/")), "{url}");
                let id = last_segment(&url);
                let resp = reqwest::Client::new()
                    .get(&url)
                    .header("Accept", ct.as_str())
                    .send()
                    .await
                    .expect("GET note");
                assert_eq!(resp.status().as_u16(), 200, "{url}");
                let got_ct = resp.headers()["content-type"].to_str().unwrap().to_string();
                assert_eq!(got_ct, ct);
                let body = resp.bytes().await.expect("body").to_vec();
                assert_eq!(Some(body), d.binary(&id).and_then(|b| b.bytes(&ct)));
                checked += 1;
            }
        }
        // Reports still point at Binary/{id} on the FHIR base.
        for dr in d.resources("DiagnosticReport", &pid) {
            for (url, _) in attachment_urls(&dr) {
                assert!(url.starts_with("Binary/"), "{url}");
            }
        }
    }
    assert!(checked > 3, "{checked}");
    // Without Accept: the default type. A token sent anyway is counted.
    let id = d
        .patient_ids()
        .iter()
        .flat_map(|p| d.binary_ids(p))
        .next()
        .expect("an attachment");
    let resp = reqwest::Client::new()
        .get(format!("{storage}/notes/{id}"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("GET note");
    assert_eq!(resp.status().as_u16(), 200);
    let doc = d.binary(&id).unwrap();
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        doc.default_content_type()
    );
    let unknown = reqwest::get(format!("{storage}/notes/nope"))
        .await
        .expect("GET");
    assert_eq!(unknown.status().as_u16(), 404);
    let stats = sb.stats();
    assert_eq!(stats.storage_attachment_downloads, checked + 1);
    assert_eq!(stats.storage_requests, checked + 2);
    assert_eq!(stats.storage_requests_with_authorization, 1);
    assert_eq!(stats.binary_reads, 0);
    sb.shutdown().await;

    // Off by default: Binary URLs, and the storage origin has no notes.
    let (sb, _token) = started(SandboxOptions::default()).await;
    let [id, ..] = sample_binaries(sb.dataset());
    let resp = reqwest::get(format!("{}/notes/{id}", sb.storage_origin()))
        .await
        .expect("GET");
    assert_eq!(resp.status().as_u16(), 404);
    sb.shutdown().await;
}
