//! The exporter against a deliberately hostile FHIR server (`support/hostile.rs`): path-like resource
//! types in search pages and bulk manifests, types nobody asked for, absurd token lifetimes, status
//! URLs and `next` links on another origin, endless error bodies, pages, manifests and discovery
//! documents. Each run is the real binary in its own process, so a panic, a hang or a memory blow-up
//! shows; every run must end failed or partial with a message that says why, write nothing outside
//! its run folder, and never send the token to another origin.

#[path = "support/hostile.rs"]
mod hostile;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use epic_export::auth::{Algorithm, SigningKey, keys};
use hostile::{Hostile, Lie, PATIENT_TEXT, TOKEN};
use serde_json::{Value, json};

/// What a run of the binary came to.
#[derive(Debug)]
struct Ran {
    code: i32,
    stderr: String,
    /// Peak resident memory of the exporter process, in MiB.
    max_rss_mib: f64,
}

/// A folder with a key and a config for the hostile server.
struct Case {
    dir: tempfile::TempDir,
    config: PathBuf,
}

const SEARCH: &str = "  search:\n    patients: [p1]\n    resources: [{type: Condition}]\n";
const BULK: &str = "  bulk:\n    group: g1\n    maxWaitHours: 0.01\n";

impl Case {
    /// `source` is the YAML under `source:`; `extra` goes at the end (e.g. `limits`).
    fn new(h: &Hostile, token_url: bool, source: &str, extra: &str) -> Case {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::generate(Algorithm::ES384).unwrap();
        keys::write_key_pair(&key, &dir.path().join("keys")).unwrap();
        let token = if token_url {
            format!("  tokenUrl: {}\n", h.token_url())
        } else {
            String::new()
        };
        let yaml = format!(
            "name: test-export\nfhir:\n  baseUrl: {}\n{token}auth:\n  clientId: hostile\n  privateKeyFile: keys/private.pem\n\
             source:\n{source}output:\n  directory: out\n\
             limits:\n  concurrency: 2\n  requestsPerSecond: 0\n  maxAttempts: 2\n{extra}",
            h.base_url()
        );
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, yaml).unwrap();
        Case { dir, config }
    }

    fn export_dir(&self) -> PathBuf {
        self.dir.path().join("out/test-export")
    }

    /// Runs `epic-export run` on the config, measuring the process' peak memory.
    async fn run(&self) -> Ran {
        let config = self.config.clone();
        let ran = tokio::time::timeout(
            Duration::from_secs(120),
            tokio::task::spawn_blocking(move || run_measured(&config)),
        )
        .await
        .expect("the run ends (no endless polling or reading)")
        .unwrap();
        assert!(
            !ran.stderr.contains("panicked"),
            "the exporter panicked:\n{}",
            ran.stderr
        );
        assert!(ran.code != 101, "exit 101 is a panic:\n{}", ran.stderr);
        ran
    }

    /// The summary of the last run: the published one (`latest`) or the newest failed one.
    fn summary(&self) -> Value {
        let export = self.export_dir();
        let mut candidates: Vec<PathBuf> = std::fs::read_dir(&export)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join("summary.json").is_file())
            .collect();
        candidates.sort();
        let latest = export.join("latest");
        let dir = if latest.exists() {
            latest
        } else {
            candidates.pop().expect("a run folder with summary.json")
        };
        serde_json::from_slice(&std::fs::read(dir.join("summary.json")).unwrap()).unwrap()
    }

    /// Every file under the case folder is the config, the keys, or inside the export's folder; and
    /// nothing named `marker` exists beside the case folder either.
    fn assert_contained(&self, marker: &str) {
        let root = self.dir.path();
        for path in walk(root) {
            let rel = path.strip_prefix(root).unwrap();
            assert!(
                rel == Path::new("config.yaml")
                    || rel.starts_with("keys")
                    || rel.starts_with("out/test-export"),
                "written outside the export folder: {}",
                path.display()
            );
            assert!(
                !rel.to_string_lossy().contains(marker),
                "a server-chosen name became a path: {}",
                path.display()
            );
        }
        let beside: Vec<_> = std::fs::read_dir(root.parent().unwrap())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains(marker))
            .collect();
        assert!(
            beside.is_empty(),
            "written beside the case folder: {beside:?}"
        );
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Runs the binary and waits for it with `wait4`, which also reports its peak RSS.
#[allow(
    clippy::zombie_processes,
    reason = "the child is reaped by wait4, not Child::wait"
)]
fn run_measured(config: &Path) -> Ran {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_epic-export"))
        .args(["run", "--no-progress", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        out.read_to_string(&mut s).unwrap();
        s
    });
    let mut stderr = String::new();
    err.read_to_string(&mut stderr).unwrap();
    reader.join().unwrap();
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as libc::pid_t;
    // SAFETY: pid is our child, not waited for elsewhere; both pointers are valid for the call.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4");
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -libc::WTERMSIG(status)
    };
    Ran {
        code,
        stderr,
        max_rss_mib: usage.ru_maxrss as f64 / 1024.0,
    }
}

fn errors(summary: &Value) -> String {
    summary["errors"].to_string()
}

fn failed_requests(case: &Case) -> String {
    let mut text = String::new();
    for p in walk(&case.export_dir()) {
        if p.ends_with("errors/failed-requests.ndjson") {
            text.push_str(&std::fs::read_to_string(p).unwrap());
        }
    }
    text
}

fn assert_token_stayed_home(h: &Hostile) {
    for s in h.seen_elsewhere() {
        assert!(
            s.authorization
                .as_deref()
                .is_none_or(|a| !a.contains(TOKEN)),
            "the token went to another origin: {s:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_like_types_in_search_pages_never_become_paths() {
    for (i, t) in [
        "../../../../hostile-escape-a",
        "../hostile-escape-b",
        "Condition/../../hostile-escape-c",
        "hostile-escape-d",
        "/tmp/hostile-escape-e",
    ]
    .iter()
    .enumerate()
    {
        let h = Hostile::start(Lie::SearchType {
            resource_type: t.to_string(),
        })
        .await;
        let case = Case::new(&h, true, SEARCH, "");
        let ran = case.run().await;
        assert_eq!(ran.code, 3, "case {i}: partial\n{}", ran.stderr);
        let summary = case.summary();
        assert_eq!(summary["outcome"], "partial");
        assert!(errors(&summary).contains("1 searches failed"), "{summary}");
        let failures = failed_requests(&case);
        assert!(
            failures.contains("invalid resource type name"),
            "case {i}: {failures}"
        );
        assert!(
            !failures.contains("hostile-escape"),
            "the bad name is not repeated"
        );
        case.assert_contained("hostile-escape");
        assert!(!Path::new("/tmp/hostile-escape-e.ndjson").exists());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_type_the_search_did_not_ask_for_is_an_error_not_a_file() {
    let h = Hostile::start(Lie::SearchType {
        resource_type: "Evil".into(),
    })
    .await;
    let case = Case::new(&h, true, SEARCH, "");
    let ran = case.run().await;
    assert_eq!(ran.code, 3, "{}", ran.stderr);
    assert!(
        failed_requests(&case).contains("type Evil that the search for Condition did not ask for")
    );
    case.assert_contained("Evil");

    // With `_include`, the included type is welcome.
    let h = Hostile::start(Lie::SearchType {
        resource_type: "Practitioner".into(),
    })
    .await;
    let case = Case::new(
        &h,
        true,
        "  search:\n    patients: [p1]\n    resources: [{type: Condition, params: {_include: \"Condition:asserter:Practitioner\"}}]\n",
        "",
    );
    let ran = case.run().await;
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    assert!(
        case.export_dir()
            .join("latest/Practitioner.ndjson")
            .is_file()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_next_link_to_another_origin_is_not_followed() {
    let h = Hostile::start(Lie::ForeignNext).await;
    let case = Case::new(&h, true, SEARCH, "");
    let ran = case.run().await;
    assert_eq!(ran.code, 3, "{}", ran.stderr);
    assert!(failed_requests(&case).contains("another origin"));
    assert!(h.seen_elsewhere().is_empty(), "{:?}", h.seen_elsewhere());
    case.assert_contained("hostile-escape");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_token_lifetimes_neither_panic_nor_stop_the_run() {
    for expires_in in [
        json!(1e300),
        json!(-5),
        json!(0),
        json!("abc"),
        json!("1e400"),
        json!(18446744073709551615u64),
        json!(null),
        json!([1]),
    ] {
        let h = Hostile::start(Lie::TokenAnswer(
            json!({"access_token": TOKEN, "token_type": "bearer", "expires_in": expires_in}),
        ))
        .await;
        let case = Case::new(&h, true, SEARCH, "");
        let ran = case.run().await;
        assert_eq!(ran.code, 0, "expires_in {expires_in}: {}", ran.stderr);
    }
    // A token answer that is not a token fails with a message, not a panic.
    for answer in [
        json!({"token_type": "bearer"}),
        json!({"access_token": TOKEN, "token_type": "MAC"}),
        json!([]),
    ] {
        let h = Hostile::start(Lie::TokenAnswer(answer.clone())).await;
        let case = Case::new(&h, true, SEARCH, "");
        let ran = case.run().await;
        assert_eq!(ran.code, 1, "{answer}: {}", ran.stderr);
        assert!(ran.stderr.contains("token endpoint"), "{}", ran.stderr);
        assert!(
            !case.export_dir().exists(),
            "nothing is created before a token"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_the_scopes_attachments_and_hydration_lack() {
    let granted = |scope: &str| {
        Lie::TokenAnswer(
            json!({"access_token": TOKEN, "token_type": "bearer", "expires_in": 3600, "scope": scope}),
        )
    };
    let extra = "attachments:\n  enabled: true\nhydrate: [Medication, Location]\n";
    let check = |case: &Case| {
        std::process::Command::new(env!("CARGO_BIN_EXE_epic-export"))
            .args(["check", "--config"])
            .arg(&case.config)
            .output()
            .unwrap()
    };
    let h = Hostile::start(granted("system/Condition.read system/Location.read")).await;
    let case = Case::new(&h, true, SEARCH, extra);
    let out = check(&case);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("scope: MISSING system/Binary.read system/Medication.read")
            && stdout.contains("Binary.Read (R4), Medication.Read (R4)")
            && stdout.contains("auth.scope"),
        "{stdout}"
    );
    // A wildcard grant covers them.
    let h = Hostile::start(granted("system/*.read")).await;
    let case = Case::new(&h, true, SEARCH, extra);
    let out = check(&case);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("scope: ok for Binary, Medication, Location"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_like_types_in_a_bulk_manifest_never_become_paths() {
    let h = Hostile::start(Lie::ManifestTypes(vec![
        ("output", "../../../../hostile-escape-f".into()),
        ("output", "Condition".into()),
        ("error", "../hostile-escape-g".into()),
        ("deleted", "../../hostile-escape-h".into()),
        ("deleted", "x/../y".into()),
    ]))
    .await;
    let case = Case::new(&h, true, BULK, "");
    let ran = case.run().await;
    assert_eq!(ran.code, 3, "{}", ran.stderr);
    let summary = case.summary();
    let errs = errors(&summary);
    assert_eq!(
        errs.matches("invalid resource type name").count(),
        4,
        "{errs}"
    );
    assert!(!errs.contains("hostile-escape"));
    // The honest file is there.
    let condition =
        std::fs::read_to_string(case.export_dir().join("latest/Condition.ndjson")).unwrap();
    assert_eq!(condition.lines().count(), 1);
    case.assert_contained("hostile-escape");
    // Only the listed files of valid types were fetched.
    let fetched: Vec<String> = h
        .seen()
        .into_iter()
        .filter(|s| s.path_and_query.starts_with("/fhir/files/"))
        .map(|s| s.path_and_query)
        .collect();
    assert_eq!(fetched, vec!["/fhir/files/1.ndjson".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_url_on_another_origin_fails_the_kick_off() {
    let h = Hostile::start(Lie::ForeignStatusUrl).await;
    let case = Case::new(&h, true, BULK, "");
    let ran = case.run().await;
    assert_eq!(ran.code, 1, "failed, not unfinished: {}", ran.stderr);
    let summary = case.summary();
    let errs = errors(&summary);
    assert!(
        errs.contains("Content-Location") && errs.contains("tokenHosts"),
        "{errs}"
    );
    assert!(h.seen_elsewhere().is_empty(), "never polled");
    // Nothing of it is resumed: the next run kicks off again (and fails the same way).
    let ran = case.run().await;
    assert_eq!(ran.code, 1);
    let kickoffs = h
        .seen()
        .iter()
        .filter(|s| s.path_and_query.contains("$export"))
        .count();
    assert_eq!(kickoffs, 2);
    assert_token_stayed_home(&h);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_manifest_fails_instead_of_polling_on() {
    let h = Hostile::start(Lie::EndlessManifest).await;
    let case = Case::new(&h, true, BULK, "");
    let ran = case.run().await;
    assert_eq!(ran.code, 1, "{}", ran.stderr);
    let errs = errors(&case.summary());
    assert!(errs.contains("larger than 16777216 bytes"), "{errs}");
    assert!(ran.max_rss_mib < 100.0, "peak RSS {} MiB", ran.max_rss_mib);
    let polls = h
        .seen()
        .iter()
        .filter(|s| s.path_and_query == "/fhir/status/1")
        .count();
    assert_eq!(polls, 1, "one oversized manifest ends the polling");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_error_bodies_keep_memory_flat() {
    for status in [500, 400] {
        let h = Hostile::start(Lie::HugeErrors { status }).await;
        let patients: Vec<String> = (0..40).map(|i| format!("p{i}")).collect();
        let case = Case::new(
            &h,
            true,
            &format!(
                "  search:\n    patients: [{}]\n    resources: [{{type: Condition}}]\n",
                patients.join(", ")
            ),
            "",
        );
        // Eight requests in flight, each answered with an endless error.
        let yaml = std::fs::read_to_string(&case.config)
            .unwrap()
            .replace("concurrency: 2", "concurrency: 8");
        std::fs::write(&case.config, yaml).unwrap();
        let ran = case.run().await;
        assert_eq!(ran.code, 3, "HTTP {status}: {}", ran.stderr);
        assert!(errors(&case.summary()).contains("40 searches failed"));
        assert!(
            ran.max_rss_mib < 64.0,
            "HTTP {status}: peak RSS {:.1} MiB",
            ran.max_rss_mib
        );
        eprintln!(
            "endless HTTP {status} bodies: peak RSS {:.1} MiB",
            ran.max_rss_mib
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_search_page_is_cut_at_its_bound() {
    let h = Hostile::start(Lie::EndlessPage).await;
    let case = Case::new(&h, true, SEARCH, "");
    let ran = case.run().await;
    assert_eq!(ran.code, 3, "{}", ran.stderr);
    assert!(failed_requests(&case).contains("larger than 67108864 bytes"));
    // One page in flight at a time per search: the 64 MiB bound, plus the process itself.
    assert!(
        ran.max_rss_mib < 160.0,
        "peak RSS {:.1} MiB",
        ran.max_rss_mib
    );
    eprintln!("endless page: peak RSS {:.1} MiB", ran.max_rss_mib);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_cannot_send_the_assertion_over_plain_http_or_flood_memory() {
    let h = Hostile::start(Lie::Discovery {
        token_endpoint: "http://tokens.example.org/oauth2/token".into(),
    })
    .await;
    let case = Case::new(&h, false, SEARCH, "");
    let ran = case.run().await;
    assert_eq!(ran.code, 1);
    assert!(
        ran.stderr.contains("discovered token endpoint is refused")
            && ran.stderr.contains("plain http"),
        "{}",
        ran.stderr
    );

    let h = Hostile::start(Lie::EndlessDiscovery).await;
    let case = Case::new(&h, false, SEARCH, "");
    let ran = case.run().await;
    assert_eq!(ran.code, 1);
    assert!(
        ran.stderr.contains("larger than 1048576 bytes"),
        "{}",
        ran.stderr
    );
    assert!(
        ran.max_rss_mib < 64.0,
        "peak RSS {:.1} MiB",
        ran.max_rss_mib
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_servers_words_about_a_patient_stay_in_the_run_folder() {
    let h = Hostile::start(Lie::FileErrorAboutAPatient).await;
    let case = Case::new(&h, true, BULK, "");
    let ran = case.run().await;
    assert_eq!(ran.code, 3, "{}", ran.stderr);
    let summary = case.summary();
    let errs = errors(&summary);
    assert!(
        errs.contains("HTTP 403 (OperationOutcome: security)"),
        "{errs}"
    );
    assert!(
        !errs.contains("Jane") && !ran.stderr.contains("Jane"),
        "{errs}"
    );
    // The whole answer is kept where PHI belongs: the run folder.
    assert!(failed_requests(&case).contains(PATIENT_TEXT));
}
