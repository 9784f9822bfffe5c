//! Progress of a run: a bar on a terminal (items done of total, records, rate, and a status such as the
//! server's `X-Progress`), otherwise a plain log line every 10 seconds. Shows counts only, never patient
//! identifiers.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
    unit: &'static str,
    state: Mutex<State>,
}

struct State {
    total: u64,
    done: u64,
    records: u64,
    status: String,
    started: Instant,
    last_log: Instant,
}

impl Progress {
    /// A bar when `interactive` and stderr is a terminal, log lines otherwise. `unit` names what
    /// `total` counts ("patients", "files").
    pub fn new(total: u64, unit: &'static str, interactive: bool) -> Self {
        let bar = (interactive && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let template = format!(
                "{{spinner}} [{{elapsed_precise}}] {{bar:30}} {{pos}}/{{len}} {unit}  {{msg}}"
            );
            bar.set_style(
                ProgressStyle::with_template(&template)
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        let now = Instant::now();
        Progress {
            bar,
            unit,
            state: Mutex::new(State {
                total,
                done: 0,
                records: 0,
                status: String::new(),
                started: now,
                last_log: now,
            }),
        }
    }

    /// Sets the number of items once it is known (bulk: the manifest's files).
    pub fn set_total(&self, total: u64) {
        if let Ok(mut s) = self.state.lock() {
            s.total = total;
        }
        if let Some(bar) = &self.bar {
            bar.set_length(total);
        }
    }

    /// A short status shown next to the counts (e.g. the server's `X-Progress`).
    pub fn set_status(&self, status: &str) {
        if let Ok(mut s) = self.state.lock() {
            s.status = status.to_owned();
            self.show(&mut s);
        }
    }

    /// One item finished with `records` new records.
    pub fn item_done(&self, records: u64) {
        if let Ok(mut s) = self.state.lock() {
            s.done += 1;
            s.records += records;
            self.show(&mut s);
        }
    }

    fn show(&self, s: &mut State) {
        let rate = s.records as f64 / s.started.elapsed().as_secs_f64().max(0.001);
        if let Some(bar) = &self.bar {
            bar.set_position(s.done);
            bar.set_message(format!("{} records  {rate:.0}/s  {}", s.records, s.status));
        } else if s.last_log.elapsed() >= Duration::from_secs(10) {
            s.last_log = Instant::now();
            tracing::info!(
                done = s.done,
                total = s.total,
                unit = self.unit,
                records = s.records,
                records_per_s = rate as u64,
                status = %s.status,
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
