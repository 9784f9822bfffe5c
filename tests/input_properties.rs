//! Property tests (proptest) of the parsers that read what the exporter does not control: the
//! original tool's INI files and CSV rosters and resource lists, search bundles and bulk manifests a
//! server sends, `Retry-After`, `expires_in`, and server-supplied type names and URLs. Whatever the
//! input: no panic, and what is accepted obeys the rules the rest of the code relies on (ids and
//! types that can name files, tokens only for trusted origins, waits within their bounds).

use std::path::Path;
use std::time::{Duration, SystemTime};

use epic_export::auth::token::{MAX_TOKEN_LIFETIME, MIN_TOKEN_LIFETIME, token_lifetime};
use epic_export::config::{ini, roster};
use epic_export::export::bulk::manifest::{FileRef, Kind, Manifest, plan_downloads};
use epic_export::fhir::bundle::{ResourceHead, parse_page, push_compact_line};
use epic_export::fhir::ndjson::check_line;
use epic_export::http::retry::parse_retry_after;
use epic_export::trust::{check_transport, is_resource_type};
use proptest::prelude::*;
use serde_json::{Value, json};

/// Arbitrary JSON values, a few levels deep, with keys FHIR uses more likely.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<f64>().prop_map(|f| json!(f)),
        any::<i64>().prop_map(|i| json!(i)),
        ".{0,20}".prop_map(Value::String),
        prop_oneof![
            Just("Bundle"),
            Just("Condition"),
            Just("OperationOutcome"),
            Just("../../x"),
            Just("")
        ]
        .prop_map(|s| json!(s)),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        let key = prop_oneof![
            Just("resourceType".to_owned()),
            Just("entry".to_owned()),
            Just("resource".to_owned()),
            Just("link".to_owned()),
            Just("relation".to_owned()),
            Just("url".to_owned()),
            Just("search".to_owned()),
            Just("mode".to_owned()),
            Just("id".to_owned()),
            "[a-z]{1,6}",
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key, inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Search bundles that are nearly right: entries of arbitrary types, links of any kind.
fn bundle() -> impl Strategy<Value = Value> {
    let entry = (
        prop_oneof![
            Just("Condition".to_owned()),
            Just("OperationOutcome".to_owned()),
            ".{0,12}"
        ],
        json_value(),
        prop::option::of(prop_oneof![Just("match"), Just("outcome"), Just("include")]),
    )
        .prop_map(|(t, extra, mode)| {
            let mut e = json!({"resource": {"resourceType": t, "id": "1", "x": extra}});
            if let Some(m) = mode {
                e["search"] = json!({ "mode": m });
            }
            e
        });
    (
        prop::collection::vec(entry, 0..8),
        prop::option::of(".{0,30}"),
    )
        .prop_map(|(entry, next)| {
            let mut b = json!({"resourceType": "Bundle", "type": "searchset", "entry": entry});
            if let Some(n) = next {
                b["link"] = json!([{"relation": "next", "url": n}]);
            }
            b
        })
}

/// What serde_json says of a bulk NDJSON line: the `resourceType` if it is a JSON object (every
/// string valid, surrogates in pairs) with a string `resourceType` once and `id`, if any, a string
/// or null once. `Err` for numbers serde_json cannot hold (the grammar allows them).
fn serde_verdict(line: &[u8]) -> Result<Option<String>, ()> {
    match serde_json::from_slice::<Value>(line) {
        Err(e) if e.to_string().contains("out of range") => return Err(()),
        Err(_) => return Ok(None),
        Ok(v) if !v.is_object() => return Ok(None),
        Ok(_) => {}
    }
    Ok(serde_json::from_slice::<ResourceHead>(line)
        .ok()
        .map(|h| h.resource_type.into_owned()))
}

/// A resource line as a server may send it: any JSON under a resource's keys.
fn resource_line() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![Just("Observation".to_owned()), ".{0,12}"],
        prop::option::of(prop_oneof![
            Just(json!("o1")),
            Just(Value::Null),
            json_value()
        ]),
        json_value(),
        any::<bool>(),
    )
        .prop_map(|(t, id, body, pretty)| {
            let mut r = json!({"resourceType": t, "body": body});
            if let Some(id) = id {
                r["id"] = id;
            }
            if pretty {
                serde_json::to_string_pretty(&r)
                    .unwrap()
                    .replace('\n', " ")
                    .into_bytes()
            } else {
                serde_json::to_vec(&r).unwrap()
            }
        })
}

/// A byte string to splice into a line: JSON's own characters, escapes good and bad, bytes that
/// are not UTF-8.
fn splice() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::sample::select(vec![
            "\"",
            "\\",
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            "0",
            "-",
            "e",
            "E",
            ".",
            "+",
            "t",
            "n",
            "true",
            "null",
            "\\u",
            "\\ud83d",
            "\\ude00",
            "\\ud83d\\ude00",
            "\\u00e9",
            "\\n",
            "\\x",
            " ",
            "\t",
            "\u{1}",
            "\"resourceType\":\"X\",",
            "\"id\":1,",
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
        prop::collection::vec(any::<u8>(), 1..3),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn search_pages_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_page(&bytes);
    }

    #[test]
    fn search_pages_split_every_resource_once(b in prop_oneof![bundle(), json_value()]) {
        let text = serde_json::to_vec(&b).unwrap();
        if let Ok(page) = parse_page(&text) {
            let entries = b["entry"].as_array().map(|e| e.iter().filter(|e| e.get("resource").is_some()).count()).unwrap_or(0);
            prop_assert_eq!(page.resources.len() + page.outcomes.len(), entries);
            for r in page.resources.iter().chain(&page.outcomes) {
                // Compacting a resource keeps its value and gives one line.
                let mut line = Vec::new();
                push_compact_line(r.get().as_bytes(), &mut line);
                prop_assert_eq!(line.iter().filter(|&&c| c == b'\n').count(), 1);
                let back: Value = serde_json::from_slice(&line).unwrap();
                let orig: Value = serde_json::from_str(r.get()).unwrap();
                prop_assert_eq!(back, orig);
            }
        }
    }

    #[test]
    fn manifests_never_panic_and_only_valid_types_are_downloaded(
        bytes in prop::collection::vec(any::<u8>(), 0..256),
        files in prop::collection::vec((0..3usize, prop_oneof![Just("Patient".to_owned()), ".{0,10}"], prop_oneof![
            Just("https://fhir.example.org/f/1".to_owned()),
            Just("https://files.example.org/f/2".to_owned()),
            Just("https://evil.example.net/f/3".to_owned()),
            ".{0,30}",
        ]), 0..10),
        requires in any::<bool>(),
    ) {
        let _ = serde_json::from_slice::<Manifest>(&bytes);
        let mut m = Manifest { transaction_time: None, request: None, requires_access_token: requires, output: vec![], error: vec![], deleted: vec![] };
        for (list, t, url) in files {
            let f = FileRef { resource_type: t, url, count: None };
            match list { 0 => m.output.push(f), 1 => m.error.push(f), _ => m.deleted.push(f) }
        }
        let fhir = "https://fhir.example.org";
        let (downloads, refused) = plan_downloads(&m, fhir, &[], &["https://files.example.org".to_owned()]);
        prop_assert_eq!(downloads.len() + refused.len(), m.output.len() + m.error.len() + m.deleted.len());
        for d in &downloads {
            prop_assert!(is_resource_type(&d.file.resource_type));
            let origin = url::Url::parse(&d.file.url).unwrap().origin().ascii_serialization();
            prop_assert!(origin == fhir || origin == "https://files.example.org");
            // The token only ever for the FHIR origin, and only when the manifest asks for it.
            prop_assert!(d.token_origins.is_empty() || (requires && origin == fhir && d.token_origins == vec![fhir.to_owned()]));
            prop_assert!(matches!(d.kind, Kind::Output | Kind::Error | Kind::Deleted));
        }
    }

    #[test]
    fn retry_after_is_bounded(value in prop_oneof![
        ".{0,40}",
        any::<u64>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| f.to_string()),
        "[A-Z][a-z]{2}, [0-9]{2} [A-Z][a-z]{2} [0-9]{4} [0-9]{2}:[0-9]{2}:[0-9]{2} GMT",
    ], now in 0u64..(1u64 << 40), max in 0u64..100_000) {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(now);
        let max = Duration::from_secs(max);
        if let Some(wait) = parse_retry_after(&value, now, max) {
            prop_assert!(wait <= max);
        }
    }

    #[test]
    fn token_lifetimes_are_clamped(secs in prop_oneof![any::<f64>().prop_map(Some), Just(None)]) {
        let d = token_lifetime(secs);
        prop_assert!(d >= MIN_TOKEN_LIFETIME && d <= MAX_TOKEN_LIFETIME);
    }

    #[test]
    fn resource_type_names_can_name_files(s in ".{0,80}") {
        if is_resource_type(&s) {
            prop_assert!(!s.contains('/') && !s.contains('.') && !s.contains('\0'));
            prop_assert!(s.len() <= 64 && s.starts_with(|c: char| c.is_ascii_uppercase()));
        }
    }

    #[test]
    fn urls_from_anywhere_never_panic_the_transport_rule(s in ".{0,60}", insecure in any::<bool>()) {
        if let Ok(u) = url::Url::parse(&s) {
            let _ = check_transport(&u, insecure);
        }
    }

    #[test]
    fn ini_files_never_panic(text in prop_oneof![
        ".{0,300}",
        prop::collection::vec(prop_oneof![
            Just("[paths]".to_owned()),
            Just("[oauth_settings]".to_owned()),
            Just("[email]".to_owned()),
            Just("[schedule]".to_owned()),
            "[a-z_]{1,20} ?= ?[^\n]{0,40}",
            "[a-z_]{1,20} ?= ?\\$\\{[a-z_]{0,12}\\}[^\n]{0,10}",
        ], 0..20).prop_map(|lines| lines.join("\n")),
    ]) {
        let dir = tempfile::tempdir().unwrap();
        let _ = ini::config_from_ini_text(&text, Path::new("x.ini"), dir.path(), "x");
    }

    #[test]
    fn rosters_accept_only_ids_that_can_be_sent(text in prop_oneof![
        ".{0,200}",
        prop::collection::vec("[a-zA-Z0-9.,\"_ -]{0,30}", 0..10).prop_map(|l| format!("patient_id,name\n{}", l.join("\n"))),
    ]) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("roster.csv");
        std::fs::write(&path, &text).unwrap();
        match roster::read_roster(&path) {
            Ok(ids) => {
                prop_assert!(!ids.is_empty());
                let mut unique = ids.clone();
                unique.sort();
                unique.dedup();
                prop_assert_eq!(unique.len(), ids.len());
                for id in &ids {
                    prop_assert!(!id.is_empty() && id.len() <= 200);
                    prop_assert!(id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')));
                }
            }
            // Errors name the file and never quote a whole line.
            Err(e) => prop_assert!(e.to_string().contains("roster.csv")),
        }
    }

    #[test]
    fn resource_lists_accept_only_type_names(text in prop_oneof![
        ".{0,200}",
        prop::collection::vec("[A-Za-z./]{0,14}(,[a-z_=&%0-9]{0,20})?", 0..8).prop_map(|l| format!("resource_type,search_params\n{}", l.join("\n"))),
    ]) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resources.csv");
        std::fs::write(&path, &text).unwrap();
        if let Ok(searches) = roster::read_resources(&path) {
            for s in searches {
                prop_assert!(is_resource_type(&s.resource_type));
            }
        }
    }

    #[test]
    fn bulk_lines_are_judged_as_serde_json_judges_them(
        line in resource_line(),
        cuts in prop::collection::vec((any::<prop::sample::Index>(), 0..3usize, prop::option::of(splice())), 0..4),
    ) {
        // The line as sent, then with bytes removed or replaced at a few places.
        let mut line = line;
        let mut variants = vec![line.clone()];
        for (at, remove, insert) in cuts {
            let at = at.index(line.len() + 1);
            let end = (at + remove).min(line.len());
            line.splice(at..end, insert.unwrap_or_default());
            variants.push(line.clone());
        }
        for v in variants {
            let Ok(want) = serde_verdict(&v) else { continue };
            let got = check_line(&v).ok().map(|h| h.resource_type.into_owned());
            prop_assert_eq!(got, want, "{}", String::from_utf8_lossy(&v));
        }
    }
}
