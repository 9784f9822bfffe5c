//! The standalone scheduler, `epic-export schedule --config FILE`: runs the export on `schedule.cron`
//! in `schedule.timeZone` with the same schedule code as the operator (`crate::schedule`), one run at
//! a time. The last scheduled time is kept in `<output>/<name>/.schedule-state.json`, so after a
//! restart the most recent missed run is made up, and only if it is at most `startingDeadlineSeconds`
//! late. SIGTERM or Ctrl-C lets the current run finish, or abandons it cleanly after a grace period
//! (its staging folder is never published and the next run removes it).

use std::path::{Path, PathBuf};
use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::ConfigError;
use crate::run::{RunError, RunOutcome};
use crate::schedule::{
    ConcurrencyPolicy, Schedule, ScheduleError, ScheduleInput, ScheduleNote, decide,
};

/// Why the scheduler cannot start.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "{config}: no schedule: add `schedule: {{cron: \"0 2 * * *\", timeZone: America/Chicago}}` to the config, or pass --cron"
    )]
    NoSchedule { config: String },
    #[error("{config}: {source}")]
    Schedule {
        config: String,
        source: ScheduleError,
    },
    #[error("cannot write {path}: {source}")]
    State {
        path: String,
        source: std::io::Error,
    },
}

/// Default for `schedule.startingDeadlineSeconds`.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(3600);

const STATE_FILE: &str = ".schedule-state.json";

/// What the scheduler does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Run now, for this scheduled time.
    Run(Timestamp),
    /// Nothing is due: wait until this instant, then look again.
    Wait(Timestamp),
    /// The expression never matches again.
    Never,
}

/// The next step (pure): `last` is the last scheduled time run (from the state file), `started`
/// when this scheduler started (nothing before it is due unless `last` says so).
pub fn next_step(
    schedule: &Schedule,
    last: Option<Timestamp>,
    started: Timestamp,
    now: Timestamp,
    deadline: Duration,
) -> (Step, Vec<ScheduleNote>) {
    let decision = decide(&ScheduleInput {
        schedule,
        suspend: false,
        concurrency: ConcurrencyPolicy::Forbid,
        starting_deadline: Some(deadline),
        last_scheduled: last,
        created: started,
        active: &[],
        now,
    });
    let step = match (decision.start, decision.requeue_at) {
        (Some(slot), _) => Step::Run(slot),
        (None, Some(at)) => Step::Wait(at),
        (None, None) => Step::Never,
    };
    (step, decision.notes)
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct State {
    /// RFC 3339.
    last_scheduled: Option<String>,
}

impl State {
    fn last(&self) -> Option<Timestamp> {
        self.last_scheduled.as_deref().and_then(|t| t.parse().ok())
    }
}

fn state_path(output_dir: &Path, name: &str) -> PathBuf {
    output_dir.join(name).join(STATE_FILE)
}

fn read_state(path: &Path) -> State {
    crate::output::read_json(path).unwrap_or_default()
}

/// Writes the state (`0600`) beside the runs, making the export's folder (`0700`) on the first run.
fn write_state(path: &Path, state: &State) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        crate::output::create_private_dir(dir)?;
    }
    crate::output::write_json_atomic(path, state)
}

/// The schedule of `epic-export schedule`: `--cron`/`--time-zone` over the config's `schedule`; an INI
/// file without `[schedule]` keeps the original tool's daily run, at 02:00 in the system's time zone.
pub fn resolve(
    config: &Path,
    cron: Option<String>,
    time_zone: Option<String>,
    grace: Duration,
) -> Result<SchedulerOptions, SchedulerError> {
    let from_config = crate::config::load_schedule(config)?;
    let (expr, zone, deadline) = match (cron, from_config) {
        (Some(c), from) => (c, time_zone.or(from.and_then(|f| f.time_zone)), None),
        (None, Some(f)) => (
            f.cron,
            time_zone.or(f.time_zone),
            f.starting_deadline_seconds,
        ),
        (None, None) if crate::config::is_ini(config) => {
            let zone =
                time_zone.or_else(|| jiff::tz::TimeZone::system().iana_name().map(str::to_owned));
            tracing::info!(
                "{} has no [schedule]: running daily at 02:00 ({}); set [schedule] cron = ... or pass --cron to change it",
                config.display(),
                zone.as_deref().unwrap_or("UTC")
            );
            ("0 2 * * *".to_owned(), zone, None)
        }
        (None, None) => {
            return Err(SchedulerError::NoSchedule {
                config: config.display().to_string(),
            });
        }
    };
    let schedule =
        Schedule::parse(&expr, zone.as_deref()).map_err(|source| SchedulerError::Schedule {
            config: config.display().to_string(),
            source,
        })?;
    Ok(SchedulerOptions {
        config: config.to_owned(),
        schedule,
        deadline: deadline
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_DEADLINE),
        grace,
    })
}

/// How `epic-export schedule` runs.
pub struct SchedulerOptions {
    pub config: PathBuf,
    pub schedule: Schedule,
    pub deadline: Duration,
    /// How long a run may go on after a stop request before it is abandoned.
    pub grace: Duration,
}

/// Runs until `stop` turns true (exit 0), or until the schedule never fires again.
pub async fn run(
    options: SchedulerOptions,
    mut stop: watch::Receiver<bool>,
) -> Result<u8, SchedulerError> {
    let started = Timestamp::now();
    let first = crate::config::load_plan(&options.config)?;
    let state_file = state_path(&first.output_dir, &first.name);
    tracing::info!(
        schedule = %options.schedule.expression(),
        time_zone = %options.schedule.time_zone_name(),
        "scheduler started for export {}",
        first.name
    );
    loop {
        let now = Timestamp::now();
        let last = read_state(&state_file).last();
        let (step, notes) = next_step(&options.schedule, last, started, now, options.deadline);
        for note in notes {
            tracing::warn!("{note}");
        }
        match step {
            Step::Never => {
                tracing::warn!("the schedule never fires again; stopping");
                return Ok(0);
            }
            Step::Wait(at) => {
                let zoned = at.to_zoned(options.schedule.time_zone().clone());
                tracing::info!("next run at {}", zoned.strftime("%Y-%m-%d %H:%M:%S %Z"));
                let wait = Duration::try_from(at.duration_since(now)).unwrap_or_default();
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.wait_for(|s| *s) => return Ok(0),
                }
            }
            Step::Run(slot) => {
                // Recorded before the run, like a CronJob's lastScheduleTime: a crash mid-run does
                // not repeat the slot (the next slot, or the next start within the deadline, runs).
                if let Err(e) = write_state(
                    &state_file,
                    &State {
                        last_scheduled: Some(slot.to_string()),
                    },
                ) {
                    return Err(SchedulerError::State {
                        path: state_file.display().to_string(),
                        source: e,
                    });
                }
                tracing::info!("run scheduled for {slot} starting");
                let run = crate::run::run_config_file(&options.config, false);
                tokio::pin!(run);
                let code = tokio::select! {
                    code = &mut run => code,
                    _ = stop.wait_for(|s| *s) => {
                        tracing::info!(
                            "stop requested: letting the current run finish (at most {} s)",
                            options.grace.as_secs()
                        );
                        match tokio::time::timeout(options.grace, &mut run).await {
                            Ok(code) => log_code(code),
                            Err(_) => tracing::warn!("the run was abandoned after the grace period; nothing of it was published, and the next run cleans up"),
                        }
                        return Ok(0);
                    }
                };
                log_code(code);
            }
        }
    }
}

fn log_code(result: Result<RunOutcome, RunError>) {
    match result {
        Ok(outcome) => {
            outcome.report();
            tracing::info!(exit_code = outcome.exit_code(), "run finished");
        }
        Err(e) => tracing::error!("run failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn steps_with_an_injected_clock() {
        let s = Schedule::parse("0 2 * * *", Some("America/Chicago")).unwrap();
        let hour = Duration::from_secs(3600);
        // First start: nothing is due before it; wait for 02:00 Chicago (08:00 UTC in winter).
        let started = ts("2026-12-01T12:00:00Z");
        let (step, _) = next_step(&s, None, started, started, hour);
        assert_eq!(step, Step::Wait(ts("2026-12-02T08:00:00.1Z")));
        // Restarted 30 minutes after a missed 02:00 run: made up.
        let last = Some(ts("2026-12-01T08:00:00Z"));
        let now = ts("2026-12-02T08:30:00Z");
        assert_eq!(
            next_step(&s, last, now, now, hour).0,
            Step::Run(ts("2026-12-02T08:00:00Z"))
        );
        // Restarted 2 hours after: too late, skipped with a MissSchedule note, wait for tomorrow.
        let now = ts("2026-12-02T10:00:00Z");
        let (step, notes) = next_step(&s, last, now, now, hour);
        assert_eq!(step, Step::Wait(ts("2026-12-03T08:00:00.1Z")));
        assert_eq!(notes[0].reason(), "MissSchedule");
        // Down for a week: only the most recent run is made up.
        let now = ts("2026-12-08T08:10:00Z");
        assert_eq!(
            next_step(&s, last, now, now, hour).0,
            Step::Run(ts("2026-12-08T08:00:00Z"))
        );
        // Just ran today's: wait for tomorrow.
        let last = Some(ts("2026-12-02T08:00:00Z"));
        let now = ts("2026-12-02T08:05:00Z");
        assert_eq!(
            next_step(&s, last, now, now, hour).0,
            Step::Wait(ts("2026-12-03T08:00:00.1Z"))
        );
        // Past the last representable new year, a yearly schedule never comes again (a day that
        // never comes, such as 30 February, is refused by Schedule::parse).
        let yearly = Schedule::parse("0 0 1 1 *", None).unwrap();
        let (last, end) = (ts("9999-01-01T00:00:00Z"), ts("9999-06-01T00:00:00Z"));
        assert_eq!(
            next_step(&yearly, Some(last), end, end, hour).0,
            Step::Never
        );
    }

    #[test]
    fn state_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = state_path(dir.path(), "nightly");
        assert_eq!(read_state(&path).last(), None);
        let t = ts("2026-12-01T08:00:00Z");
        write_state(
            &path,
            &State {
                last_scheduled: Some(t.to_string()),
            },
        )
        .unwrap();
        assert_eq!(read_state(&path).last(), Some(t));
    }
}
