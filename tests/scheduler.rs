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

    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_epic-export"))
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
