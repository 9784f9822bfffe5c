//! Progress of a run: a bar on a terminal (patients done of total, records, rate), otherwise a plain log
//! line every 10 seconds. Shows counts only, never patient identifiers.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    state: Mutex<State>,
}

struct State {
    done: u64,
    records: u64,
    started: Instant,
    last_log: Instant,
}

impl Progress {
    /// A bar when `interactive` and stderr is a terminal, log lines otherwise.
    pub fn new(total: u64, interactive: bool) -> Self {
        let bar = (interactive && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} patients  {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        let now = Instant::now();
        Progress {
            bar,
            total,
            state: Mutex::new(State {
                done: 0,
                records: 0,
                started: now,
                last_log: now,
            }),
        }
    }

    /// One patient finished with `records` new records.
    pub fn patient_done(&self, records: u64) {
        let Ok(mut s) = self.state.lock() else { return };
        s.done += 1;
        s.records += records;
        let rate = s.records as f64 / s.started.elapsed().as_secs_f64().max(0.001);
        if let Some(bar) = &self.bar {
            bar.set_position(s.done);
            bar.set_message(format!("{} records  {rate:.0}/s", s.records));
        } else if s.last_log.elapsed() >= Duration::from_secs(10) {
            s.last_log = Instant::now();
            tracing::info!(
                patients_done = s.done,
                patients_total = self.total,
                records = s.records,
                records_per_s = rate as u64,
                "progress"
            );
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
