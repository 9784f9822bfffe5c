//! Tests of the sandbox's Bulk Data export (`bulk.rs`) over real sockets: kick-off rules,
//! polling, the manifest, file contents against `Dataset::resources`, gzip and ranges, the
//! throttle, DELETE and expiry, the storage origin and the bulk faults.

use std::collections::BTreeMap;
use std::io::Read;

use super::*;

/// Small files and no throttle unless a test needs them.
fn bulk_opts() -> SandboxOptions {
    SandboxOptions {
        patients: 8,
        bulk_delay: Duration::from_millis(300),
        bulk_file_size: 50,
        bulk_throttle: Duration::ZERO,
        ..SandboxOptions::default()
    }
}

fn group_export(sb: &Sandbox) -> String {
    format!("{}/Group/{SANDBOX_GROUP_ID}/$export", sb.base_url())
}

/// A kick-off with the required headers and `params` in the query.
async fn kickoff(url: &str, token: &str, params: &[(&str, &str)]) -> reqwest::Response {
    let mut url = url::Url::parse(url).expect("kick-off url");
    if !params.is_empty() {
        url.query_pairs_mut().extend_pairs(params);
    }
    reqwest::Client::new()
        .get(url)
        .bearer_auth(token)
        .header("Accept", "application/fhir+json")
        .header("Prefer", "respond-async")
        .send()
        .await
        .expect("kick-off")
}

/// Kicks off, expects 202, returns the status URL.
async fn kickoff_ok(url: &str, token: &str, params: &[(&str, &str)]) -> String {
    let resp = kickoff(url, token, params).await;
    let status = resp.status().as_u16();
    let location = resp
        .headers()
        .get("content-location")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = resp.text().await.unwrap_or_default();
    assert_eq!(status, 202, "{body}");
    location.expect("Content-Location")
}

/// Polls until the manifest is served.
async fn manifest(status_url: &str, token: &str) -> Value {
    for _ in 0..200 {
        let resp = get(status_url, token).await;
        match resp.status().as_u16() {
            202 => {
                let progress = resp.headers()["x-progress"].to_str().expect("x-progress");
                assert!(progress.ends_with("% complete"), "{progress}");
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            200 => {
                assert_eq!(resp.headers()["content-type"], "application/json");
                return resp.json().await.expect("manifest json");
            }
            other => panic!(
                "status poll: {other}: {}",
                resp.text().await.unwrap_or_default()
            ),
        }
    }
    panic!("the export never completed");
}

/// The lines of an NDJSON body, checking that every line ends with `\n`.
fn ndjson(body: &[u8]) -> Vec<Value> {
    let text = std::str::from_utf8(body).expect("utf-8");
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "unterminated last line"
    );
    text.lines()
        .map(|l| serde_json::from_str(l).expect("NDJSON line"))
        .collect()
}

async fn download(url: &str, token: &str) -> Vec<Value> {
    let resp = get(url, token).await;
    assert_eq!(resp.status(), 200, "{url}");
    assert_eq!(resp.headers()["content-type"], "application/fhir+ndjson");
    ndjson(&resp.bytes().await.expect("file body"))
}

/// Every output file's lines, per type, in manifest order; checks each file's `count`.
async fn outputs(manifest: &Value, token: &str) -> BTreeMap<String, Vec<Value>> {
    let mut by_type: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for out in manifest["output"].as_array().expect("output") {
        let lines = download(out["url"].as_str().expect("url"), token).await;
        assert_eq!(out["count"], lines.len(), "{out}");
        let t = out["type"].as_str().expect("type").to_string();
        assert!(lines.iter().all(|r| r["resourceType"] == t.as_str()));
        by_type.entry(t).or_default().extend(lines);
    }
    by_type
}

/// What an export of `types` should hold, per type, keeping resources `keep` accepts.
fn expected(
    ds: &Dataset,
    types: &[&str],
    keep: impl Fn(&str, &Value) -> bool,
) -> BTreeMap<String, Vec<Value>> {
    let mut map = BTreeMap::new();
    for t in types {
        let all: Vec<Value> = ds
            .patient_ids()
            .iter()
            .flat_map(|p| ds.resources(t, p))
            .filter(|r| keep(t, r))
            .collect();
        if !all.is_empty() {
            map.insert(t.to_string(), all);
        }
    }
    map
}

fn all_types() -> Vec<&'static str> {
    std::iter::once("Patient")
        .chain(SEARCH_TYPES.iter().copied())
        .collect()
}

fn diagnostics(outcome: &Value) -> String {
    assert_eq!(outcome["resourceType"], "OperationOutcome", "{outcome}");
    outcome["issue"][0]["diagnostics"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn bulk_kickoff_header_and_param_errors() {
    let (sb, token) = started(SandboxOptions::default()).await;
    let url = group_export(&sb);
    let client = reqwest::Client::new();

    let no_token = client
        .get(&url)
        .header("Accept", "application/fhir+json")
        .header("Prefer", "respond-async")
        .send()
        .await
        .expect("send");
    assert_eq!(no_token.status(), 401);

    for (accept, prefer, needle) in [
        (None, Some("respond-async"), "Accept"),
        (Some("application/json"), Some("respond-async"), "Accept"),
        (Some("application/fhir+json"), None, "Prefer"),
        (
            Some("application/fhir+json"),
            Some("respond-sync"),
            "Prefer",
        ),
    ] {
        let mut req = client.get(&url).bearer_auth(&token);
        if let Some(a) = accept {
            req = req.header("Accept", a);
        }
        if let Some(p) = prefer {
            req = req.header("Prefer", p);
        }
        let resp = req.send().await.expect("send");
        assert_eq!(resp.status(), 400, "{accept:?} {prefer:?}");
        let body: Value = resp.json().await.expect("json");
        assert!(diagnostics(&body).contains(needle), "{body}");
    }

    for params in [
        vec![("_type", "Patient,Foo")],
        vec![("_since", "yesterday")],
        vec![("_since", "2024-01-01")],
        vec![("_outputFormat", "text/csv")],
        vec![("_typeFilter", "Observation?status=final")],
        vec![("_typeFilter", "Foo?code=1")],
        vec![("_typeFilter", "no-question-mark")],
    ] {
        let resp = kickoff(&url, &token, &params).await;
        assert_eq!(resp.status(), 400, "{params:?}");
        let body: Value = resp.json().await.expect("json");
        assert!(!diagnostics(&body).is_empty());
    }

    let resp = kickoff(
        &format!("{}/Group/not-a-group/$export", sb.base_url()),
        &token,
        &[],
    )
    .await;
    assert_eq!(resp.status(), 404);

    // None of the refused kick-offs counted for the throttle; the accepted forms all work.
    for format in ["application/fhir+ndjson", "application/ndjson", "ndjson"] {
        let resp = kickoff(&url, &token, &[("_outputFormat", format)]).await;
        if format == "application/fhir+ndjson" {
            assert_eq!(resp.status(), 202, "{format}");
        } else {
            assert_eq!(resp.status(), 429, "{format}: throttled, not refused");
        }
    }
    assert_eq!(sb.stats().bulk_kickoffs, 15, "authenticated kick-offs");
}

#[tokio::test]
async fn bulk_group_export_polls_then_serves_exactly_the_dataset() {
    let (sb, token) = started(bulk_opts()).await;
    let url = group_export(&sb);
    let resp = kickoff(&url, &token, &[]).await;
    assert_eq!(resp.status(), 202);
    let status_url = resp.headers()["content-location"]
        .to_str()
        .expect("location")
        .to_string();
    assert!(
        status_url.starts_with(&format!("{}/bulk/status/", sb.base_url())),
        "{status_url}"
    );

    let first = get(&status_url, &token).await;
    assert_eq!(first.status(), 202);
    assert_eq!(first.headers()["retry-after"], "1");
    let progress = first.headers()["x-progress"].to_str().expect("progress");
    assert!(progress.ends_with("% complete"), "{progress}");

    let m = manifest(&status_url, &token).await;
    assert_eq!(m["request"], url.as_str());
    assert_eq!(m["requiresAccessToken"], true);
    assert_eq!(m["deleted"], json!([]));
    let tt: jiff::Timestamp = m["transactionTime"]
        .as_str()
        .expect("transactionTime")
        .parse()
        .expect("RFC 3339");
    assert!((jiff::Timestamp::now() - tt).get_seconds().abs() < 60);

    let got = outputs(&m, &token).await;
    let want = expected(sb.dataset(), &all_types(), |_, _| true);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (t, resources) in &want {
        assert_eq!(&got[t], resources, "{t}");
    }
    // Files are at most 50 resources; Observation needs several.
    let outs = m["output"].as_array().expect("output");
    assert!(outs.iter().all(|o| o["count"].as_u64().unwrap_or(0) <= 50));
    assert!(outs.iter().filter(|o| o["type"] == "Observation").count() > 1);
    assert!(outs.iter().all(|o| o["count"].as_u64().unwrap_or(0) >= 1));

    // DocumentReference was exported, so there is one warning in one error file.
    let errors = m["error"].as_array().expect("error");
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["type"], "OperationOutcome");
    let lines = download(errors[0]["url"].as_str().expect("url"), &token).await;
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["issue"][0]["severity"], "warning");

    let stats = sb.stats();
    assert_eq!(stats.bulk_kickoffs, 1);
    assert!(stats.bulk_polls >= 2);
    assert_eq!(stats.bulk_downloads, outs.len() as u64 + 1);
}

#[tokio::test]
async fn bulk_gzip_and_range_downloads() {
    let (sb, token) = started(bulk_opts()).await;
    let status_url = kickoff_ok(&group_export(&sb), &token, &[("_type", "Observation")]).await;
    let m = manifest(&status_url, &token).await;
    assert_eq!(m["error"], json!([]), "no DocumentReference, no error file");
    let file = m["output"][0]["url"].as_str().expect("url").to_string();
    // A client that neither asks for nor decodes gzip by itself.
    let raw = reqwest::Client::builder()
        .no_gzip()
        .build()
        .expect("client");

    let plain = raw
        .get(&file)
        .bearer_auth(&token)
        .send()
        .await
        .expect("get");
    assert_eq!(plain.status(), 200);
    assert!(plain.headers().get("content-encoding").is_none());
    let length: usize = content_length(&plain) as usize;
    let plain = plain.bytes().await.expect("body");
    assert_eq!(plain.len(), length);
    assert_eq!(ndjson(&plain).len(), 50);

    let zipped = raw
        .get(&file)
        .bearer_auth(&token)
        .header("Accept-Encoding", "gzip")
        .send()
        .await
        .expect("get");
    assert_eq!(zipped.status(), 200);
    assert_eq!(zipped.headers()["content-encoding"], "gzip");
    let zipped = zipped.bytes().await.expect("body");
    assert!(zipped.len() < plain.len());
    let mut unzipped = Vec::new();
    flate2::read::GzDecoder::new(&zipped[..])
        .read_to_end(&mut unzipped)
        .expect("gunzip");
    assert_eq!(unzipped, plain);

    // A range is served uncompressed even when gzip is accepted.
    let part = raw
        .get(&file)
        .bearer_auth(&token)
        .header("Accept-Encoding", "gzip")
        .header("Range", "bytes=100-")
        .send()
        .await
        .expect("get");
    assert_eq!(part.status(), 206);
    assert_eq!(
        part.headers()["content-range"],
        format!("bytes 100-{}/{}", plain.len() - 1, plain.len()).as_str()
    );
    assert_eq!(part.bytes().await.expect("body"), plain.slice(100..));

    let beyond = raw
        .get(&file)
        .bearer_auth(&token)
        .header("Range", format!("bytes={}-", plain.len()))
        .send()
        .await
        .expect("get");
    assert_eq!(beyond.status(), 416);
}

#[tokio::test]
async fn bulk_type_typefilter_and_since_select_subsets() {
    let (sb, token) = started(bulk_opts()).await;
    let since = "2024-01-01T00:00:00Z";
    let status_url = kickoff_ok(
        &group_export(&sb),
        &token,
        &[
            ("_type", "Observation,Condition"),
            ("_type", "Patient"),
            ("_typeFilter", "Observation?category=laboratory,vital-signs"),
            ("_since", since),
        ],
    )
    .await;
    let got = outputs(&manifest(&status_url, &token).await, &token).await;
    let cutoff: jiff::Timestamp = since.parse().expect("since");
    let newer = |r: &Value| {
        r["meta"]["lastUpdated"]
            .as_str()
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
            .is_some_and(|t| t > cutoff)
    };
    let want = expected(
        sb.dataset(),
        &["Observation", "Condition", "Patient"],
        |t, r| {
            newer(r)
                && (t != "Observation"
                    || has_category(r, "laboratory")
                    || has_category(r, "vital-signs")
                    || r["category"][1]["coding"][0]["code"] == "laboratory")
        },
    );
    assert_eq!(got, want);
    let everything = expected(sb.dataset(), &["Observation"], |_, _| true);
    let obs = &got["Observation"];
    assert!(!obs.is_empty() && obs.len() < everything["Observation"].len());
    assert!(obs.iter().all(|r| !has_category(r, "social-history")));

    // Repeated filters for one type are OR'd; Patient/$export and $export select everyone.
    let status_url = kickoff_ok(
        &format!("{}/Patient/$export", sb.base_url()),
        &token,
        &[
            ("_type", "Observation"),
            ("_typeFilter", "Observation?category=social-history"),
            ("_typeFilter", "Observation?code=http://loinc.org|8867-4"),
        ],
    )
    .await;
    let got = outputs(&manifest(&status_url, &token).await, &token).await;
    let want = expected(sb.dataset(), &["Observation"], |_, r| {
        has_category(r, "social-history") || r["code"]["coding"][0]["code"] == "8867-4"
    });
    assert_eq!(got, want);

    let status_url = kickoff_ok(
        &format!("{}/$export", sb.base_url()),
        &token,
        &[("_type", "Patient")],
    )
    .await;
    let got = outputs(&manifest(&status_url, &token).await, &token).await;
    assert_eq!(got, expected(sb.dataset(), &["Patient"], |_, _| true));
}

#[tokio::test]
async fn bulk_throttle_answers_like_epic() {
    let (sb, token) = started(SandboxOptions::default()).await;
    kickoff_ok(&group_export(&sb), &token, &[("_type", "Patient")]).await;
    let again = kickoff(&group_export(&sb), &token, &[("_type", "Condition")]).await;
    assert_eq!(again.status(), 429);
    assert!(again.headers().get("retry-after").is_none());
    let body: Value = again.json().await.expect("json");
    assert_eq!(
        diagnostics(&body),
        "Error processing Bulk Data Kickoff request: Request not allowed: The Client requested this Group too recently."
    );
    // System and patient level share the group "*", separate from the sandbox group.
    kickoff_ok(&format!("{}/Patient/$export", sb.base_url()), &token, &[]).await;
    let system = kickoff(&format!("{}/$export", sb.base_url()), &token, &[]).await;
    assert_eq!(system.status(), 429);
}

#[tokio::test]
async fn bulk_delete_then_404_and_expiry() {
    let opts = SandboxOptions {
        // Long enough that a loaded CI machine still fetches the file before it expires.
        bulk_expiry: Duration::from_secs(3),
        ..bulk_opts()
    };
    let (sb, token) = started(opts).await;
    let status_url = kickoff_ok(&group_export(&sb), &token, &[("_type", "Patient")]).await;
    let m = manifest(&status_url, &token).await;
    let file = m["output"][0]["url"].as_str().expect("url").to_string();
    let client = reqwest::Client::new();
    let deleted = client
        .delete(&status_url)
        .bearer_auth(&token)
        .send()
        .await
        .expect("delete");
    assert_eq!(deleted.status(), 202);
    assert_eq!(get(&status_url, &token).await.status(), 404);
    assert_eq!(get(&file, &token).await.status(), 404);
    let again = client
        .delete(&status_url)
        .bearer_auth(&token)
        .send()
        .await
        .expect("delete");
    assert_eq!(again.status(), 404);
    assert_eq!(sb.stats().bulk_deletes, 2);

    // Expiry: served for 3 s after completion, then gone.
    let status_url = kickoff_ok(&group_export(&sb), &token, &[("_type", "Patient")]).await;
    let m = manifest(&status_url, &token).await;
    let file = m["output"][0]["url"].as_str().expect("url").to_string();
    assert_eq!(get(&file, &token).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let (status, body) = get_json(&status_url, &token).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(get(&file, &token).await.status(), 404);
}

#[tokio::test]
async fn bulk_storage_origin_serves_presigned_urls_without_tokens() {
    let opts = SandboxOptions {
        bulk_files_on_storage: true,
        ..bulk_opts()
    };
    let (sb, token) = started(opts).await;
    let storage = sb.storage_origin();
    assert_ne!(storage, sb.base_url());
    let status_url = kickoff_ok(&group_export(&sb), &token, &[]).await;
    let m = manifest(&status_url, &token).await;
    assert_eq!(m["requiresAccessToken"], false);
    let client = reqwest::Client::new();
    let mut got: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for out in m["output"].as_array().expect("output") {
        let url = out["url"].as_str().expect("url");
        assert!(url.starts_with(&format!("{storage}/files/")), "{url}");
        assert!(url.contains("?sig="), "{url}");
        let resp = client.get(url).send().await.expect("get");
        assert_eq!(resp.status(), 200);
        let lines = ndjson(&resp.bytes().await.expect("body"));
        assert_eq!(out["count"], lines.len());
        got.entry(out["type"].as_str().expect("type").to_string())
            .or_default()
            .extend(lines);
    }
    assert_eq!(got, expected(sb.dataset(), &all_types(), |_, _| true));
    let files = m["output"].as_array().map_or(0, Vec::len) as u64;

    let url = m["output"][0]["url"].as_str().expect("url");
    let (unsigned, _) = url.split_once("?sig=").expect("sig");
    assert_eq!(
        client.get(unsigned).send().await.expect("get").status(),
        403
    );
    let wrong = format!("{unsigned}?sig=0000");
    assert_eq!(client.get(&wrong).send().await.expect("get").status(), 403);
    let with_token = client
        .get(url)
        .bearer_auth(&token)
        .send()
        .await
        .expect("get");
    assert_eq!(with_token.status(), 200);
    let stats = sb.stats();
    assert_eq!(stats.storage_requests, files + 3);
    assert_eq!(stats.storage_requests_with_authorization, 1);
    assert_eq!(stats.bulk_downloads, files + 1);
}

#[tokio::test]
async fn bulk_redirect_download_fault_points_at_storage() {
    let (sb, token) = started(bulk_opts()).await;
    let status_url = kickoff_ok(&group_export(&sb), &token, &[("_type", "Condition")]).await;
    let m = manifest(&status_url, &token).await;
    let file = m["output"][0]["url"].as_str().expect("url").to_string();
    let direct = download(&file, &token).await;

    sb.inject(Fault::RedirectDownload);
    // The fault waits for a file download: a poll passes untouched.
    assert_eq!(get(&status_url, &token).await.status(), 200);
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let resp = no_redirects
        .get(&file)
        .bearer_auth(&token)
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status(), 307);
    let location = resp.headers()["location"].to_str().expect("location");
    assert!(location.starts_with(&sb.storage_origin()), "{location}");
    let resp = reqwest::get(location).await.expect("get");
    assert_eq!(resp.status(), 200);
    assert_eq!(ndjson(&resp.bytes().await.expect("body")), direct);
    assert_eq!(sb.stats().storage_requests_with_authorization, 0);
    // Only once.
    assert_eq!(download(&file, &token).await, direct);
}

#[tokio::test]
async fn bulk_drop_download_fault_cuts_the_body_short() {
    let (sb, token) = started(bulk_opts()).await;
    let status_url = kickoff_ok(&group_export(&sb), &token, &[("_type", "Observation")]).await;
    let m = manifest(&status_url, &token).await;
    let file = m["output"][0]["url"].as_str().expect("url").to_string();
    sb.inject(Fault::DropDownload { after_bytes: 1000 });
    let mut resp = reqwest::Client::new()
        .get(&file)
        .bearer_auth(&token)
        .header("Accept-Encoding", "gzip")
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("content-encoding").is_none());
    let full: u64 = content_length(&resp);
    assert!(full > 1000);
    let mut received = 0u64;
    let cut = loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => received += chunk.len() as u64,
            Ok(None) => break false,
            Err(_) => break true,
        }
    };
    assert!(cut, "the body should end in an error");
    assert!(received <= 1000, "{received}");
    // The next download is whole again.
    assert_eq!(download(&file, &token).await.len(), 50);
}

#[tokio::test]
async fn bulk_wrong_count_poll_outcome_and_status_faults() {
    let (sb, token) = started(bulk_opts()).await;
    sb.inject(Fault::Status {
        status: 503,
        retry_after: Some("2".into()),
    });
    let resp = kickoff(&group_export(&sb), &token, &[]).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "2");
    let status_url = kickoff_ok(&group_export(&sb), &token, &[("_type", "Patient")]).await;

    sb.inject(Fault::PollOutcome {
        status: 500,
        code: "transient".into(),
    });
    let (status, body) = get_json(&status_url, &token).await;
    assert_eq!(status, 500);
    assert_eq!(body["issue"][0]["code"], "transient");

    sb.inject(Fault::WrongCount);
    let m = manifest(&status_url, &token).await;
    assert_eq!(
        m["output"][0]["count"], 9,
        "8 patients, stated one too many"
    );
    let m = manifest(&status_url, &token).await;
    assert_eq!(m["output"][0]["count"], 8);

    sb.inject(Fault::PollOutcome {
        status: 500,
        code: "processing".into(),
    });
    let (status, body) = get_json(&status_url, &token).await;
    assert_eq!(status, 500);
    assert_eq!(body["issue"][0]["code"], "processing");
    assert_eq!(sb.stats().injected_faults, 4);
}

#[tokio::test]
async fn bulk_large_export_is_streamed_in_files_of_3000() {
    let opts = SandboxOptions {
        patients: 300,
        bulk_delay: Duration::ZERO,
        ..SandboxOptions::default()
    };
    let (sb, token) = started(opts).await;
    let status_url = kickoff_ok(&group_export(&sb), &token, &[]).await;
    let m = manifest(&status_url, &token).await;
    let outs = m["output"].as_array().expect("output");
    let total: u64 = outs.iter().filter_map(|o| o["count"].as_u64()).sum();
    assert!(total >= 20_000, "{total}");
    let want = expected(sb.dataset(), &all_types(), |_, _| true);
    assert_eq!(total, want.values().map(Vec::len).sum::<usize>() as u64);
    assert!(
        outs.iter()
            .all(|o| o["count"].as_u64().unwrap_or(0) <= 3000)
    );
    // Stream the biggest file chunk by chunk, counting lines.
    let biggest = outs
        .iter()
        .max_by_key(|o| o["count"].as_u64().unwrap_or(0))
        .expect("a file");
    let mut resp = get(biggest["url"].as_str().expect("url"), &token).await;
    let mut lines = 0u64;
    while let Some(chunk) = resp.chunk().await.expect("chunk") {
        lines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
    }
    assert_eq!(biggest["count"], lines);
}

#[test]
fn bulk_cli_flags_and_defaults() {
    use clap::Parser;
    let defaults = TestCli::try_parse_from(["sandbox"])
        .expect("parse")
        .args
        .options()
        .expect("options");
    let lib = SandboxOptions::default();
    assert_eq!(defaults.bulk_delay, lib.bulk_delay);
    assert_eq!(defaults.bulk_retry_after, lib.bulk_retry_after);
    assert_eq!(defaults.bulk_file_size, lib.bulk_file_size);
    assert_eq!(defaults.bulk_throttle, lib.bulk_throttle);
    assert_eq!(defaults.bulk_expiry, lib.bulk_expiry);
    assert!(!defaults.bulk_files_on_storage);
    assert_eq!(lib.bulk_retry_after.as_deref(), Some("1"));
    assert_eq!(lib.bulk_file_size, 3000);

    let opts = TestCli::try_parse_from([
        "sandbox",
        "--bulk-delay-ms=50",
        "--bulk-retry-after=",
        "--bulk-file-size=10",
        "--bulk-throttle-secs=0",
        "--bulk-expiry-secs=5",
        "--bulk-files-on-storage",
    ])
    .expect("parse")
    .args
    .options()
    .expect("options");
    assert_eq!(opts.bulk_delay, Duration::from_millis(50));
    assert_eq!(opts.bulk_retry_after, None);
    assert_eq!(opts.bulk_file_size, 10);
    assert!(opts.bulk_throttle.is_zero());
    assert_eq!(opts.bulk_expiry, Duration::from_secs(5));
    assert!(opts.bulk_files_on_storage);
    assert!(TestCli::try_parse_from(["sandbox", "--bulk-file-size=0"]).is_err());
}

#[tokio::test]
async fn bulk_status_without_retry_after_and_meta_is_deterministic() {
    let opts = SandboxOptions {
        bulk_retry_after: None,
        bulk_delay: Duration::from_secs(30),
        ..bulk_opts()
    };
    let (sb, token) = started(opts).await;
    let status_url = kickoff_ok(&group_export(&sb), &token, &[("_type", "Patient")]).await;
    let resp = get(&status_url, &token).await;
    assert_eq!(resp.status(), 202);
    assert!(resp.headers().get("retry-after").is_none());
    // Files of a running export are not served yet.
    let file = format!(
        "{}/bulk/file/{}/0",
        sb.base_url(),
        status_url.rsplit('/').next().unwrap_or_default()
    );
    assert_eq!(get(&file, &token).await.status(), 404);
    // Unknown jobs are 404 OperationOutcomes.
    let (status, body) = get_json(&format!("{}/bulk/status/nope", sb.base_url()), &token).await;
    assert_eq!(status, 404);
    assert!(!diagnostics(&body).is_empty());

    // meta.lastUpdated is present everywhere and does not depend on the clock.
    let ds = Dataset::generate(5, 42);
    for pid in ds.patient_ids() {
        for t in all_types() {
            for r in ds.resources(t, &pid) {
                let at: jiff::Timestamp = r["meta"]["lastUpdated"]
                    .as_str()
                    .expect("lastUpdated")
                    .parse()
                    .expect("instant");
                assert!(at >= "2022-01-01T00:00:00Z".parse().expect("t"), "{at}");
                assert!(at < "2026-01-01T00:00:00Z".parse().expect("t"), "{at}");
            }
        }
    }
}

/// A `VmRSS`/`VmHWM` (peak) line of `/proc/self/status`, in bytes (Linux only).
fn proc_status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[tokio::test]
async fn bulk_a_20000_resource_file_is_streamed_not_built_in_memory() {
    let opts = SandboxOptions {
        patients: 500,
        bulk_delay: Duration::ZERO,
        bulk_file_size: 1_000_000,
        ..SandboxOptions::default()
    };
    let (sb, token) = started(opts).await;
    let status_url = kickoff_ok(&group_export(&sb), &token, &[("_type", "Observation")]).await;
    let m = manifest(&status_url, &token).await;
    let out = &m["output"][0];
    let count = out["count"].as_u64().expect("count");
    assert!(count >= 20_000, "{count}");
    assert_eq!(m["output"].as_array().map(Vec::len), Some(1));

    let before = proc_status_bytes("VmRSS:");
    let mut resp = get(out["url"].as_str().expect("url"), &token).await;
    let (mut lines, mut bytes) = (0u64, 0u64);
    while let Some(chunk) = resp.chunk().await.expect("chunk") {
        lines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
        bytes += chunk.len() as u64;
    }
    assert_eq!(lines, count);
    // Only meaningful when this test has the process to itself (cargo-nextest).
    if std::env::var_os("NEXTEST").is_some()
        && let (Some(before), Some(peak)) = (before, proc_status_bytes("VmHWM:"))
    {
        let growth = peak.saturating_sub(before);
        assert!(
            growth < bytes / 2,
            "peak RSS grew by {growth} bytes while streaming a {bytes}-byte file"
        );
    }
}

/// The `Content-Length` the server announced.
fn content_length(resp: &reqwest::Response) -> u64 {
    resp.headers()["content-length"]
        .to_str()
        .expect("length")
        .parse()
        .expect("number")
}
