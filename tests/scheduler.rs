//! `epic-export schedule` as a process: a run missed while it was stopped is made up at start,
//! the next run time is logged, and SIGTERM stops it cleanly; a config without a schedule is refused.

mod support;

use std::time::Duration;

use epic_export::sandbox::SandboxOptions;
use jiff::Timestamp;
use support::*;

#[tokio::test]
async fn a_missed_run_is_made_up_at_start_and_sigterm_stops_cleanly() {
    let env = env(SandboxOptions::default()).await;
    let patients: Vec<String> = env
        .sandbox
        .dataset()
        .patient_ids()
        .iter()
        .take(2)
        .cloned()
        .collect();
    let config = env.write_config(
        &patients,
        "resource_type\nPatient\n",
        &format!("{FAST_LIMITS}schedule:\n  cron: \"0 3 * * *\"\n  timeZone: Europe/Paris\n  startingDeadlineSeconds: 864000\n"),
    );
    // The scheduler last ran the slot of three days ago: the most recent slot (yesterday or today)
    // was missed and is within the deadline.
    let three_days_ago = Timestamp::from_second(Timestamp::now().as_second() - 3 * 86_400).unwrap();
    std::fs::create_dir_all(env.export_dir()).unwrap();
    std::fs::write(
        env.export_dir().join(".schedule-state.json"),
        format!("{{\"lastScheduled\":\"{three_days_ago}\"}}"),
    )
    .unwrap();

    let log = env.path().join("logs/epic-export.log");
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_epic-export"))
        .arg("--log-file")
        .arg(&log)
        .args(["schedule", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let latest = env.export_dir().join("latest");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !latest.join("summary.json").exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the missed run was not made up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // It now waits for the next 03:00 Paris time; stop it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("stops within 10 s")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("next run at") && stderr.contains("03:00:00 CE"),
        "{stderr}"
    );
    let state = std::fs::read_to_string(env.export_dir().join(".schedule-state.json")).unwrap();
    assert!(
        !state.contains(&three_days_ago.to_string()),
        "the made-up slot is recorded: {state}"
    );
    assert_eq!(
        std::fs::read_to_string(latest.join("Patient.ndjson"))
            .unwrap()
            .lines()
            .count(),
        2
    );
    // The state file and the log are private like the runs: 0600 files in 0700 folders.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&env.export_dir().join(".schedule-state.json")), 0o600);
    assert_eq!(mode(&env.path().join("logs")), 0o700);
    let logs: Vec<_> = std::fs::read_dir(env.path().join("logs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(logs.len(), 1, "{logs:?}");
    assert_eq!(mode(&logs[0]), 0o600);
    assert!(
        std::fs::read_to_string(&logs[0])
            .unwrap()
            .contains("next run at")
    );
}

#[tokio::test]
async fn no_schedule_and_bad_cron_are_refused() {
    let env = env(SandboxOptions::default()).await;
    let config = env.write_config(&["x".into()], "resource_type\nPatient\n", "");
    let run = |args: Vec<String>| {
        std::process::Command::new(env!("CARGO_BIN_EXE_epic-export"))
            .args(args)
            .output()
            .unwrap()
    };
    let c = config.display().to_string();
    let out = run(vec!["schedule".into(), "--config".into(), c.clone()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no schedule"));
    let out = run(vec![
        "schedule".into(),
        "--config".into(),
        c,
        "--cron".into(),
        "0 25 * * *".into(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("0 25 * * *"));
}

#[tokio::test]
async fn the_original_ini_runs_daily_at_two_unless_its_schedule_section_says_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let ini = dir.path().join("backend_epic_using_jwt.ini");
    let base = "[paths]\nprivate_key_path = private.pem\n[oauth_settings]\nclient_id = x\ntoken_endpoint = https://fhir.example.org/oauth2/token\n";
    std::fs::write(&ini, base).unwrap();
    std::fs::write(
        dir.path().join("epic_sandbox_roster.csv"),
        "patient_id\nabc\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("epic_sandbox_resources.csv"),
        "resource_type\nPatient\n",
    )
    .unwrap();
    assert!(epic_export::config::load_schedule(&ini).unwrap().is_none());

    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_epic-export"))
        .args(["schedule", "--time-zone", "America/Chicago", "--config"])
        .arg(&ini)
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pid = child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("stops")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("running daily at 02:00 (America/Chicago)"),
        "{stderr}"
    );
    assert!(stderr.contains("02:00:00 C"), "{stderr}");

    std::fs::write(
        &ini,
        format!("{base}[schedule]\ncron = 30 1 * * 1-5\ntime_zone = Europe/Paris\nstarting_deadline_seconds = 600\n"),
    )
    .unwrap();
    let s = epic_export::config::load_schedule(&ini).unwrap().unwrap();
    assert_eq!(
        (
            s.cron.as_str(),
            s.time_zone.as_deref(),
            s.starting_deadline_seconds
        ),
        ("30 1 * * 1-5", Some("Europe/Paris"), Some(600))
    );
    std::fs::write(
        &ini,
        format!("{base}[schedule]\ntime_zone = Europe/Paris\n"),
    )
    .unwrap();
    let e = epic_export::config::load_schedule(&ini)
        .unwrap_err()
        .to_string();
    assert!(e.contains("[schedule] cron"), "{e}");
}
