//! Cron schedules with Kubernetes CronJob semantics, without Kubernetes.
//!
//! This module decides *when* an EpicExport run is due. It is pure (sans-I/O, injected clock): the
//! Kubernetes controller feeds it the spec/status it observed and acts on the returned [`Decision`]
//! (create a Job named by [`job_name`], delete Jobs, emit Events, requeue); a standalone scheduler
//! command can do the same with its own state. No Kubernetes types appear here.
//!
//! # Schedule syntax
//!
//! The same as a `batch/v1` CronJob (robfig/cron `ParseStandard`): five fields
//! `minute hour day-of-month month day-of-week`, with `*`, `,`, `-`, `/` (`N/step` means `N-max/step`),
//! month names `JAN`–`DEC` and day names `SUN`–`SAT` (case-insensitive), or one of the macros
//! `@hourly @daily @midnight @weekly @monthly @yearly @annually`. When both day-of-month and
//! day-of-week are restricted, a day matching either runs (classic cron OR). Rejected, each with an
//! explanation: a seconds or year field (6/7 fields), `TZ=`/`CRON_TZ=` prefixes (use the time zone
//! field), `@every`, and croner/Quartz extensions Kubernetes does not accept (`L`, `W`, `#`, `?`).
//! One deliberate leniency: `7` is accepted as Sunday, as in Vixie cron.
//!
//! The expression is evaluated in an IANA time zone (default UTC; the tz database is bundled in the
//! binary, so distroless images work). Daylight-saving transitions follow croner:
//!
//! - **Spring forward** (a wall-clock time that does not exist that day, e.g. `30 2 * * *` on
//!   2026-03-08 in `America/Chicago`): a job at a fixed time runs at the first instant after the gap
//!   (03:00 CDT). Upstream Kubernetes (robfig/cron) *skips* that day instead; we keep croner's
//!   behaviour because a daily export that silently skips a day is worse than one an hour late.
//!   Interval jobs (`*/15 2 * * *`) simply have no runs inside the gap.
//! - **Fall back** (a wall-clock time that happens twice, e.g. `30 1 * * *` on 2026-11-01): a job at
//!   a fixed time runs once, at the first (daylight-time) occurrence; interval jobs run in both hours.
//!
//! # Decision semantics
//!
//! See [`decide`]: it mirrors the upstream CronJob controller (`syncCronJob`), including "only the
//! most recent missed run", `startingDeadlineSeconds`, `suspend`, the concurrency policies, the
//! 100-missed-runs warning and the `next + 100 ms` requeue.

use std::fmt;
use std::time::Duration;

use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};

/// Number of missed instants after which counting stops (more than 100 ⇒ `TooManyMissedTimes`).
const MISSED_COUNT_CAP: u32 = 101;

/// Bound on the forward walk that double-checks a backward search (see `most_recent_missed`).
const FORWARD_WALK_LIMIT: u32 = 10_000;

/// Padding added to the next scheduled instant when requeueing (upstream: NTP skew).
const REQUEUE_PADDING: SignedDuration = SignedDuration::from_millis(100);

/// Longest export name whose [`job_name`] still fits a 63-character DNS label.
pub const MAX_EXPORT_NAME_LEN: usize = 52;

const FIELDS_EXPECTED: &str =
    "5 fields expected (minute hour day-of-month month day-of-week) or a macro such as @daily";

const FIELD_NAMES: [&str; 5] = ["minute", "hour", "day-of-month", "month", "day-of-week"];
const MONTH_NAMES: [&str; 12] = [
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];
const DAY_NAMES: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

/// A validated schedule: a cron expression evaluated in an IANA time zone.
#[derive(Clone, Debug)]
pub struct Schedule {
    /// The expression as written (trimmed), for messages.
    expr: String,
    cron: Cron,
    tz: TimeZone,
}

/// Why a schedule or time zone was rejected. Messages name the offending value and the fix.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ScheduleError {
    /// The cron expression is not a valid Kubernetes-compatible schedule.
    #[error("schedule {expr:?}: {reason}")]
    BadCron { expr: String, reason: String },
    /// The expression carries a `TZ=` or `CRON_TZ=` prefix.
    #[error(
        "schedule {expr:?}: TZ= and CRON_TZ= prefixes are not supported; remove the prefix and set timeZone instead (e.g. timeZone: America/Chicago)"
    )]
    TimeZoneInSchedule { expr: String },
    /// The time zone is not a known IANA name.
    #[error("timeZone {name:?}: not an IANA time zone (e.g. America/Chicago, Europe/Paris, UTC)")]
    UnknownTimeZone { name: String },
}

impl Schedule {
    /// Parses and validates `cron` (5 fields or a macro) in `time_zone` (`None` = UTC).
    pub fn parse(cron: &str, time_zone: Option<&str>) -> Result<Schedule, ScheduleError> {
        let expr = cron.trim().to_string();
        let cron = parse_cron(&expr)?;
        let tz = match time_zone {
            None => TimeZone::UTC,
            Some(name) => parse_time_zone(name)?,
        };
        let schedule = Schedule { expr, cron, tz };
        // Kubernetes accepts a day that never comes (30 February, 31 April) and never runs it; say so.
        if schedule.next_after(Timestamp::UNIX_EPOCH).is_none() {
            return Err(bad(
                &schedule.expr,
                "never matches: no month has that day (e.g. 30 February, 31 April)",
            ));
        }
        Ok(schedule)
    }

    /// The expression as written (trimmed).
    pub fn expression(&self) -> &str {
        &self.expr
    }

    /// The IANA name of the time zone (`UTC` by default).
    pub fn time_zone_name(&self) -> &str {
        self.tz.iana_name().unwrap_or("UTC")
    }

    /// The time zone, e.g. to show an instant in local time.
    pub fn time_zone(&self) -> &TimeZone {
        &self.tz
    }

    /// First scheduled instant strictly after `after`.
    ///
    /// `None` when the expression never matches again (past the last representable year; a day
    /// that never comes, such as `0 0 30 2 *`, is refused by `parse`).
    pub fn next_after(&self, after: Timestamp) -> Option<Timestamp> {
        let zoned = after.to_zoned(self.tz.clone());
        let found = self.cron.find_next_occurrence(&zoned, false).ok()?;
        let found = found.timestamp();
        // croner works in whole seconds; an `after` with a fraction of a second is truncated
        // before the exclusive step, so the result is always strictly later. Guard anyway.
        if found > after {
            Some(found)
        } else {
            self.next_after(after.checked_add(SignedDuration::from_secs(1)).ok()?)
        }
    }

    /// The most recent scheduled instant in `(since, now]`, and how many scheduled instants fall in
    /// that window (including the most recent one). The count stops at 101 (more than 100 is all
    /// that matters: upstream's `TooManyMissedTimes`).
    pub fn most_recent_missed(&self, since: Timestamp, now: Timestamp) -> Option<(Timestamp, u32)> {
        let mut latest = None;
        let mut count = 0u32;
        let mut cursor = since;
        while let Some(next) = self.next_after(cursor) {
            if next > now {
                return latest.map(|t| (t, count));
            }
            latest = Some(next);
            count += 1;
            if count >= MISSED_COUNT_CAP {
                break;
            }
            cursor = next;
        }
        let latest = latest?;
        if count < MISSED_COUNT_CAP {
            // The iteration ended because the schedule never matches again.
            return Some((latest, count));
        }
        // Too many to walk: search backwards from `now` for the latest one.
        let zoned = now.to_zoned(self.tz.clone());
        let previous = self
            .cron
            .find_previous_occurrence(&zoned, true)
            .ok()
            .map(|z| z.timestamp())
            .filter(|t| *t > latest && *t <= now)
            .unwrap_or(latest);
        // The backward search may disagree with the forward one around a DST transition;
        // confirm by a forward step that nothing lies between `previous` and `now`.
        match self.next_after(previous) {
            Some(next) if next <= now => {
                // Fall back to walking forward from `previous` (rare: transitions only). The walk
                // is bounded; past the bound the latest found so far is as good as it gets.
                let mut last = next;
                for _ in 0..FORWARD_WALK_LIMIT {
                    match self.next_after(last) {
                        Some(n) if n <= now => last = n,
                        _ => break,
                    }
                }
                Some((last, count))
            }
            _ => Some((previous, count)),
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.expr, self.time_zone_name())
    }
}

fn bad(expr: &str, reason: impl Into<String>) -> ScheduleError {
    ScheduleError::BadCron {
        expr: expr.to_string(),
        reason: reason.into(),
    }
}

fn parse_time_zone(name: &str) -> Result<TimeZone, ScheduleError> {
    let unknown = || ScheduleError::UnknownTimeZone {
        name: name.to_string(),
    };
    // Kubernetes rejects "" and "Local" (the controller host's zone is not a schedule's zone).
    if name.trim().is_empty() || name.eq_ignore_ascii_case("local") || name != name.trim() {
        return Err(unknown());
    }
    if name == "UTC" {
        return Ok(TimeZone::UTC);
    }
    TimeZone::get(name).map_err(|_| unknown())
}

fn parse_cron(expr: &str) -> Result<Cron, ScheduleError> {
    if expr.is_empty() {
        return Err(bad(expr, format!("empty; {FIELDS_EXPECTED}")));
    }
    let upper = expr.to_ascii_uppercase();
    if upper.starts_with("TZ=") || upper.starts_with("CRON_TZ=") {
        return Err(ScheduleError::TimeZoneInSchedule {
            expr: expr.to_string(),
        });
    }
    let expanded = if expr.starts_with('@') {
        expand_macro(expr)?
    } else {
        expr
    };
    let fields: Vec<&str> = expanded.split_whitespace().collect();
    match fields.len() {
        5 => {}
        n @ (6 | 7) => {
            return Err(bad(
                expr,
                format!("{FIELDS_EXPECTED}; found {n} (seconds and year fields are not supported)"),
            ));
        }
        _ => return Err(bad(expr, FIELDS_EXPECTED)),
    }
    for (i, field) in fields.iter().enumerate() {
        check_field(i, field).map_err(|reason| {
            bad(
                expr,
                format!("{} field {field:?}: {reason}", FIELD_NAMES[i]),
            )
        })?;
    }
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .sloppy_ranges(true) // `N/step` = `N-max/step`, as robfig/cron
        .build()
        .parse(&fields.join(" "))
        .map_err(|e| bad(expr, format!("invalid: {e}")))
}

fn expand_macro(expr: &str) -> Result<&'static str, ScheduleError> {
    let lower = expr.to_ascii_lowercase();
    Ok(match lower.as_str() {
        "@hourly" => "0 * * * *",
        "@daily" | "@midnight" => "0 0 * * *",
        "@weekly" => "0 0 * * 0",
        "@monthly" => "0 0 1 * *",
        "@yearly" | "@annually" => "0 0 1 1 *",
        _ if lower.starts_with("@every") => {
            return Err(bad(
                expr,
                "@every is not supported; use a step such as */15 in the minute field",
            ));
        }
        _ => {
            return Err(bad(
                expr,
                "unknown macro; use one of @hourly @daily @midnight @weekly @monthly @yearly @annually, or 5 fields (minute hour day-of-month month day-of-week)",
            ));
        }
    })
}

/// What Kubernetes would not accept in one cron field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum FieldProblem {
    #[error("a step needs a start, e.g. */10 or 5/10")]
    StepWithoutStart,
    #[error("{0}")]
    Quartz(&'static str),
    #[error("unknown month name {0:?}; use 1-12 or JAN-DEC")]
    MonthName(String),
    #[error("unknown day name {0:?}; use 0-6 or SUN-SAT")]
    DayName(String),
    #[error("names such as {0:?} are not allowed here; use numbers")]
    Name(String),
    #[error("unexpected character {0:?}")]
    Character(char),
}

/// Rejects, with an explanation, what Kubernetes would not accept but croner would.
fn check_field(index: usize, field: &str) -> Result<(), FieldProblem> {
    let names: &[&str] = match index {
        3 => &MONTH_NAMES,
        4 => &DAY_NAMES,
        _ => &[],
    };
    let mut chars = field.char_indices().peekable();
    while let Some((start, c)) = chars.next() {
        match c {
            '0'..='9' | '*' | ',' | '-' => {}
            '/' => {
                let prev = field[..start].chars().next_back();
                if matches!(prev, None | Some(',')) {
                    return Err(FieldProblem::StepWithoutStart);
                }
            }
            '?' => {
                return Err(FieldProblem::Quartz(
                    "`?` is a Quartz extension Kubernetes does not accept; use *",
                ));
            }
            '#' => {
                return Err(FieldProblem::Quartz(
                    "`#` (nth weekday of the month) is a Quartz extension Kubernetes does not accept",
                ));
            }
            c if c.is_ascii_alphabetic() => {
                let mut end = start + c.len_utf8();
                while let Some(&(i, c)) = chars.peek() {
                    if !c.is_ascii_alphabetic() {
                        break;
                    }
                    end = i + c.len_utf8();
                    chars.next();
                }
                let word = field[start..end].to_ascii_uppercase();
                if names.contains(&word.as_str()) {
                    continue;
                }
                if word == "L" {
                    return Err(FieldProblem::Quartz(
                        "`L` (last day) is a croner/Quartz extension Kubernetes does not accept; list the days explicitly",
                    ));
                }
                if word == "W" || word == "LW" {
                    return Err(FieldProblem::Quartz(
                        "`W` (nearest weekday) is a Quartz extension Kubernetes does not accept",
                    ));
                }
                return Err(match index {
                    3 => FieldProblem::MonthName(word),
                    4 => FieldProblem::DayName(word),
                    _ => FieldProblem::Name(word),
                });
            }
            c => return Err(FieldProblem::Character(c)),
        }
    }
    Ok(())
}

/// What to do when a run is due while earlier runs are still active (CronJob `concurrencyPolicy`).
///
/// The default is `Forbid` (upstream defaults to `Allow`): Epic bulk exports are long, share a
/// volume and count against API rate limits.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
pub enum ConcurrencyPolicy {
    /// Start the new run regardless.
    Allow,
    /// Do not start while any run is active; the slot stays due until the deadline passes.
    #[default]
    Forbid,
    /// Stop the active runs, then start the new one.
    Replace,
}

/// Inputs of one scheduling decision.
#[derive(Clone, Debug)]
pub struct ScheduleInput<'a> {
    pub schedule: &'a Schedule,
    pub suspend: bool,
    pub concurrency: ConcurrencyPolicy,
    pub starting_deadline: Option<Duration>,
    /// `status.lastScheduleTime`, else the object's creation time.
    pub last_scheduled: Option<Timestamp>,
    pub created: Timestamp,
    /// Names of runs (Jobs) still active.
    pub active: &'a [String],
    pub now: Timestamp,
}

/// The outcome of [`decide`].
#[derive(Debug, PartialEq, Eq)]
pub struct Decision {
    /// Start a run for this scheduled instant (the Job name comes from `job_name`).
    ///
    /// Creating it must be idempotent: if the Job already exists (a previous pass created it but
    /// did not record `lastScheduleTime`), adopt it. Either way, record `lastScheduleTime` = this.
    pub start: Option<Timestamp>,
    /// Active runs to stop first (Replace policy).
    pub stop: Vec<String>,
    /// When to look again: the next scheduled instant + 100 ms, or None when suspended/never.
    pub requeue_at: Option<Timestamp>,
    /// Notes for Events/logs, e.g. `MissSchedule` (missed by more than startingDeadlineSeconds),
    /// `TooManyMissedTimes` (>100 missed), `JobAlreadyActive` (Forbid blocked a due run).
    pub notes: Vec<ScheduleNote>,
}

/// Something worth an Event or a log line; the variant names are the upstream Event reasons.
#[derive(Debug, PartialEq, Eq, Clone)]
pub enum ScheduleNote {
    /// The most recent due run is older than `startingDeadlineSeconds`: skipped (Warning).
    MissSchedule { scheduled: Timestamp },
    /// More than 100 runs were missed; only the latest runs (Warning). `missed` is capped at 101.
    TooManyMissedTimes { missed: u32 },
    /// `Forbid` kept a due run from starting while another is active (Normal).
    JobAlreadyActive { scheduled: Timestamp },
}

impl ScheduleNote {
    /// The Kubernetes Event reason (upstream's).
    pub fn reason(&self) -> &'static str {
        match self {
            ScheduleNote::MissSchedule { .. } => "MissSchedule",
            ScheduleNote::TooManyMissedTimes { .. } => "TooManyMissedTimes",
            ScheduleNote::JobAlreadyActive { .. } => "JobAlreadyActive",
        }
    }

    /// Whether the Event is a Warning (else Normal).
    pub fn is_warning(&self) -> bool {
        !matches!(self, ScheduleNote::JobAlreadyActive { .. })
    }
}

impl fmt::Display for ScheduleNote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScheduleNote::MissSchedule { scheduled } => {
                write!(f, "missed scheduled time to start a run: {scheduled}")
            }
            ScheduleNote::TooManyMissedTimes { missed } => write!(
                f,
                "too many missed start times ({}{missed}); only the most recent runs. Set or decrease startingDeadlineSeconds or check clock skew",
                if *missed >= MISSED_COUNT_CAP {
                    ">="
                } else {
                    ""
                }
            ),
            ScheduleNote::JobAlreadyActive { scheduled } => write!(
                f,
                "not starting the run scheduled at {scheduled}: another run is active and concurrencyPolicy is Forbid"
            ),
        }
    }
}

/// Upstream CronJob semantics, one pass:
///
/// - `suspend` ⇒ nothing starts and no requeue (status upkeep only; a later unsuspend may still
///   run the most recent slot if it is within the deadline).
/// - The window is `(earliest, now]`, earliest = `last_scheduled` or `created`. Only the **most
///   recent** instant in it is considered (never a backlog).
/// - If `starting_deadline` is set and that instant is more than the deadline before `now` ⇒
///   `MissSchedule`, no start (upstream's `tooLate`). Because upstream also raises earliest to
///   `now − deadline`, its warning is in practice silent; here the skipped slot is reported. The
///   note repeats on each pass until the next slot, so deduplicate Events on the caller side.
/// - More than 100 instants in the window (after raising earliest to `now − deadline`) ⇒
///   `TooManyMissedTimes`, and the latest still runs.
/// - If an active run already has this slot's name suffix (created, but `lastScheduleTime` not
///   recorded), `start` is returned again so the caller adopts it and records the slot; nothing
///   is stopped or blocked for it.
/// - `Forbid` with other active runs ⇒ no start, `JobAlreadyActive`; the caller does not advance
///   `lastScheduleTime`, so the slot stays due and starts when the active run ends (its
///   completion re-enqueues), unless the deadline has passed by then.
/// - `Replace` ⇒ `stop` lists the active runs, then start. `Allow` ⇒ start regardless.
/// - `requeue_at` = next instant after `now` + 100 ms (None when suspended or never again).
pub fn decide(input: &ScheduleInput<'_>) -> Decision {
    let mut decision = Decision {
        start: None,
        stop: Vec::new(),
        requeue_at: None,
        notes: Vec::new(),
    };
    if input.suspend {
        return decision;
    }
    let now = input.now;
    let schedule = input.schedule;
    decision.requeue_at = schedule
        .next_after(now)
        .and_then(|next| next.checked_add(REQUEUE_PADDING).ok());

    let earliest = input.last_scheduled.unwrap_or(input.created);
    let deadline_start = input.starting_deadline.and_then(|d| {
        let d = SignedDuration::try_from(d).ok()?;
        now.checked_sub(d).ok()
    });
    let Some((scheduled, _)) = schedule.most_recent_missed(earliest, now) else {
        return decision;
    };
    if let Some(deadline_start) = deadline_start
        && scheduled < deadline_start
    {
        // scheduled + deadline < now: too late (same boundary as upstream's `tooLate`).
        decision
            .notes
            .push(ScheduleNote::MissSchedule { scheduled });
        return decision;
    }
    // Count in the window upstream uses: earliest raised to now - deadline.
    let counted_from = match deadline_start {
        Some(d) if d > earliest => d,
        _ => earliest,
    };
    if let Some((_, missed)) = schedule.most_recent_missed(counted_from, now)
        && missed > 100
    {
        decision
            .notes
            .push(ScheduleNote::TooManyMissedTimes { missed });
    }

    let suffix = format!("-{}", unix_minutes(scheduled));
    let (own, others): (Vec<&String>, Vec<&String>) = input
        .active
        .iter()
        .partition(|name| name.ends_with(&suffix));
    if !own.is_empty() {
        decision.start = Some(scheduled);
        return decision;
    }
    match input.concurrency {
        ConcurrencyPolicy::Forbid if !others.is_empty() => {
            decision
                .notes
                .push(ScheduleNote::JobAlreadyActive { scheduled });
        }
        ConcurrencyPolicy::Forbid | ConcurrencyPolicy::Allow => decision.start = Some(scheduled),
        ConcurrencyPolicy::Replace => {
            decision.stop = others.into_iter().cloned().collect();
            decision.start = Some(scheduled);
        }
    }
    decision
}

fn unix_minutes(t: Timestamp) -> i64 {
    t.as_second().div_euclid(60)
}

/// Deterministic run/Job name: `<export>-<unix minutes of scheduled>` (as upstream CronJobs).
///
/// The export name must be at most 52 characters (the CRD enforces it), so the result fits a
/// 63-character DNS label; a longer name is cut to 52 (and any trailing `-` dropped) as a safety net.
pub fn job_name(export: &str, scheduled: Timestamp) -> String {
    let base = crate::text::truncate(export, MAX_EXPORT_NAME_LEN).trim_end_matches('-');
    format!("{base}-{}", unix_minutes(scheduled))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn sched(expr: &str) -> Schedule {
        Schedule::parse(expr, None).unwrap_or_else(|e| panic!("{e}"))
    }

    fn chicago(expr: &str) -> Schedule {
        Schedule::parse(expr, Some("America/Chicago")).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn parses_kubernetes_schedules() {
        // (expression, after, expected next) in UTC
        let cases = [
            ("0 2 * * *", "2026-01-01T00:00:00Z", "2026-01-01T02:00:00Z"),
            (
                "*/15 * * * *",
                "2026-01-01T00:07:00Z",
                "2026-01-01T00:15:00Z",
            ),
            (
                "5/20 * * * *",
                "2026-01-01T00:26:00Z",
                "2026-01-01T00:45:00Z",
            ),
            (
                "0 9-17/4 * * MON-FRI",
                "2026-01-03T00:00:00Z",
                "2026-01-05T09:00:00Z",
            ),
            (
                "0 0 1,15 jan,Jul *",
                "2026-01-02T00:00:00Z",
                "2026-01-15T00:00:00Z",
            ),
            ("30 4 * * 7", "2026-01-01T00:00:00Z", "2026-01-04T04:30:00Z"),
            // Day-of-month OR day-of-week when both are restricted: the 13th, or a Monday.
            ("0 0 13 * 1", "2026-01-06T00:00:00Z", "2026-01-12T00:00:00Z"),
            (
                "  0 2 * * *  ",
                "2026-01-01T02:00:00Z",
                "2026-01-02T02:00:00Z",
            ),
            ("@hourly", "2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z"),
            ("@daily", "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"),
            ("@midnight", "2026-01-01T12:00:00Z", "2026-01-02T00:00:00Z"),
            ("@weekly", "2026-01-01T00:00:00Z", "2026-01-04T00:00:00Z"),
            ("@monthly", "2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z"),
            ("@yearly", "2026-01-01T00:00:00Z", "2027-01-01T00:00:00Z"),
            ("@ANNUALLY", "2026-01-01T00:00:00Z", "2027-01-01T00:00:00Z"),
        ];
        for (expr, after, want) in cases {
            let s = sched(expr);
            assert_eq!(
                s.next_after(ts(after)),
                Some(ts(want)),
                "{expr} after {after}"
            );
        }
    }

    #[test]
    fn rejects_non_kubernetes_schedules() {
        let fields = "5 fields expected (minute hour day-of-month month day-of-week) or a macro such as @daily";
        let cases: &[(&str, String)] = &[
            ("0 2 * *", format!("schedule \"0 2 * *\": {fields}")),
            ("", format!("schedule \"\": empty; {fields}")),
            (
                "0 0 2 * * *",
                format!(
                    "schedule \"0 0 2 * * *\": {fields}; found 6 (seconds and year fields are not supported)"
                ),
            ),
            (
                "0 0 2 * * * 2026",
                format!(
                    "schedule \"0 0 2 * * * 2026\": {fields}; found 7 (seconds and year fields are not supported)"
                ),
            ),
            (
                "TZ=America/Chicago 0 2 * * *",
                "schedule \"TZ=America/Chicago 0 2 * * *\": TZ= and CRON_TZ= prefixes are not supported; remove the prefix and set timeZone instead (e.g. timeZone: America/Chicago)".into(),
            ),
            (
                "CRON_TZ=UTC 0 2 * * *",
                "schedule \"CRON_TZ=UTC 0 2 * * *\": TZ= and CRON_TZ= prefixes are not supported; remove the prefix and set timeZone instead (e.g. timeZone: America/Chicago)".into(),
            ),
            (
                "0 0 L * *",
                "schedule \"0 0 L * *\": day-of-month field \"L\": `L` (last day) is a croner/Quartz extension Kubernetes does not accept; list the days explicitly".into(),
            ),
            (
                "0 0 * * 5L",
                "schedule \"0 0 * * 5L\": day-of-week field \"5L\": `L` (last day) is a croner/Quartz extension Kubernetes does not accept; list the days explicitly".into(),
            ),
            (
                "0 0 15W * *",
                "schedule \"0 0 15W * *\": day-of-month field \"15W\": `W` (nearest weekday) is a Quartz extension Kubernetes does not accept".into(),
            ),
            (
                "0 0 * * 1#2",
                "schedule \"0 0 * * 1#2\": day-of-week field \"1#2\": `#` (nth weekday of the month) is a Quartz extension Kubernetes does not accept".into(),
            ),
            (
                "0 0 ? * 1",
                "schedule \"0 0 ? * 1\": day-of-month field \"?\": `?` is a Quartz extension Kubernetes does not accept; use *".into(),
            ),
            (
                "@every 1h",
                "schedule \"@every 1h\": @every is not supported; use a step such as */15 in the minute field".into(),
            ),
            (
                "@fortnightly",
                "schedule \"@fortnightly\": unknown macro; use one of @hourly @daily @midnight @weekly @monthly @yearly @annually, or 5 fields (minute hour day-of-month month day-of-week)".into(),
            ),
            (
                "0 0 * FOO *",
                "schedule \"0 0 * FOO *\": month field \"FOO\": unknown month name \"FOO\"; use 1-12 or JAN-DEC".into(),
            ),
            (
                "0 0 * * MON-FRX",
                "schedule \"0 0 * * MON-FRX\": day-of-week field \"MON-FRX\": unknown day name \"FRX\"; use 0-6 or SUN-SAT".into(),
            ),
            (
                "0 MON * * *",
                "schedule \"0 MON * * *\": hour field \"MON\": names such as \"MON\" are not allowed here; use numbers".into(),
            ),
            (
                "/10 * * * *",
                "schedule \"/10 * * * *\": minute field \"/10\": a step needs a start, e.g. */10 or 5/10".into(),
            ),
            (
                "+0 * * * *",
                "schedule \"+0 * * * *\": minute field \"+0\": unexpected character '+'".into(),
            ),
        ];
        for (expr, want) in cases {
            let err = Schedule::parse(expr, None).expect_err(expr);
            assert_eq!(err.to_string(), *want, "{expr}");
        }
        // Out-of-range values are croner's to report; only the prefix is ours.
        for expr in [
            "60 * * * *",
            "0 24 * * *",
            "0 0 32 * *",
            "0 0 * 13 *",
            "0 0 * * 8",
            "*/0 * * * *",
        ] {
            let err = Schedule::parse(expr, None).expect_err(expr).to_string();
            assert!(
                err.starts_with(&format!("schedule {expr:?}: invalid: ")),
                "{expr}: {err}"
            );
        }
    }

    #[test]
    fn time_zones() {
        for (tz, name) in [
            (None, "UTC"),
            (Some("UTC"), "UTC"),
            (Some("Europe/Paris"), "Europe/Paris"),
        ] {
            let s = Schedule::parse("0 2 * * *", tz).unwrap();
            assert_eq!(s.time_zone_name(), name);
        }
        let paris = Schedule::parse("0 2 * * *", Some("Europe/Paris")).unwrap();
        assert_eq!(
            paris.next_after(ts("2026-01-01T00:00:00Z")),
            Some(ts("2026-01-01T01:00:00Z"))
        );
        assert_eq!(paris.to_string(), "0 2 * * * (Europe/Paris)");
        for bad in ["America/Chicgo", "", "Local", " UTC", "Mars/Olympus"] {
            let err = Schedule::parse("0 2 * * *", Some(bad)).expect_err(bad);
            assert_eq!(
                err.to_string(),
                format!(
                    "timeZone {bad:?}: not an IANA time zone (e.g. America/Chicago, Europe/Paris, UTC)"
                )
            );
            assert_eq!(err, ScheduleError::UnknownTimeZone { name: bad.into() });
        }
    }

    #[test]
    fn next_after_is_strict_and_handles_fractions() {
        let s = sched("0 2 * * *");
        let cases = [
            ("2026-01-01T02:00:00Z", "2026-01-02T02:00:00Z"),
            ("2026-01-01T01:59:59.999Z", "2026-01-01T02:00:00Z"),
            ("2026-01-01T02:00:00.001Z", "2026-01-02T02:00:00Z"),
            ("2026-12-31T03:00:00Z", "2027-01-01T02:00:00Z"),
        ];
        for (after, want) in cases {
            assert_eq!(s.next_after(ts(after)), Some(ts(want)), "after {after}");
        }
        // Never matches (no 30 February, no 31 April): refused, not silently never run.
        for never in ["0 0 30 2 *", "0 0 31 4,6 *"] {
            let e = Schedule::parse(never, None).unwrap_err().to_string();
            assert!(e.contains("never matches"), "{e}");
        }
        // 29 February: the next leap year.
        assert_eq!(
            sched("0 0 29 2 *").next_after(ts("2026-01-01T00:00:00Z")),
            Some(ts("2028-02-29T00:00:00Z"))
        );
    }

    #[test]
    fn spring_forward_in_chicago() {
        // 2026-03-08 02:00 CST jumps to 03:00 CDT: 02:30 does not exist that day. croner runs a
        // fixed-time job at the first instant after the gap (03:00 CDT = 08:00Z); upstream
        // (robfig/cron) would skip the day. The days around it are at 02:30 local.
        let s = chicago("30 2 * * *");
        let runs: Vec<Timestamp> =
            std::iter::successors(s.next_after(ts("2026-03-06T12:00:00Z")), |t| {
                s.next_after(*t)
            })
            .take(3)
            .collect();
        assert_eq!(
            runs,
            [
                ts("2026-03-07T08:30:00Z"), // 02:30 CST (-06)
                ts("2026-03-08T08:00:00Z"), // 03:00 CDT (-05), the gap's end
                ts("2026-03-09T07:30:00Z"), // 02:30 CDT (-05)
            ]
        );
        // An interval job has no runs inside the gap.
        let s = chicago("*/30 2-3 * * *");
        let runs: Vec<Timestamp> =
            std::iter::successors(s.next_after(ts("2026-03-08T07:00:00Z")), |t| {
                s.next_after(*t)
            })
            .take(2)
            .collect();
        assert_eq!(
            runs,
            [ts("2026-03-08T08:00:00Z"), ts("2026-03-08T08:30:00Z")]
        );
    }

    #[test]
    fn fall_back_in_chicago() {
        // 2026-11-01 02:00 CDT falls back to 01:00 CST: 01:30 happens twice. A fixed-time job runs
        // once, at the first (CDT) occurrence.
        let s = chicago("30 1 * * *");
        let runs: Vec<Timestamp> =
            std::iter::successors(s.next_after(ts("2026-10-31T12:00:00Z")), |t| {
                s.next_after(*t)
            })
            .take(3)
            .collect();
        assert_eq!(
            runs,
            [
                ts("2026-11-01T06:30:00Z"), // 01:30 CDT (-05)
                ts("2026-11-02T07:30:00Z"), // 01:30 CST (-06) the next day
                ts("2026-11-03T07:30:00Z"),
            ]
        );
        // From inside the repeated hour (01:45 CST, after the CDT run), the next run is the next day.
        assert_eq!(
            s.next_after(ts("2026-11-01T07:45:00Z")),
            Some(ts("2026-11-02T07:30:00Z"))
        );
        // An interval job runs in both copies of the hour.
        let s = chicago("30 * * * *");
        let runs: Vec<Timestamp> =
            std::iter::successors(s.next_after(ts("2026-11-01T06:00:00Z")), |t| {
                s.next_after(*t)
            })
            .take(3)
            .collect();
        assert_eq!(
            runs,
            [
                ts("2026-11-01T06:30:00Z"),
                ts("2026-11-01T07:30:00Z"),
                ts("2026-11-01T08:30:00Z")
            ]
        );
    }

    #[test]
    fn most_recent_missed_windows() {
        let hourly = sched("0 * * * *");
        // (since, now, expected (latest, count))
        type Row = (&'static str, &'static str, Option<(&'static str, u32)>);
        let cases: &[Row] = &[
            // none
            ("2026-01-01T00:00:00Z", "2026-01-01T00:59:59Z", None),
            // since is exclusive, now inclusive
            ("2026-01-01T01:00:00Z", "2026-01-01T01:00:00Z", None),
            (
                "2026-01-01T00:00:00Z",
                "2026-01-01T01:00:00Z",
                Some(("2026-01-01T01:00:00Z", 1)),
            ),
            // one
            (
                "2026-01-01T00:30:00Z",
                "2026-01-01T01:10:00Z",
                Some(("2026-01-01T01:00:00Z", 1)),
            ),
            // several: the latest and the count
            (
                "2026-01-01T00:30:00Z",
                "2026-01-01T05:10:00Z",
                Some(("2026-01-01T05:00:00Z", 5)),
            ),
            // exactly 100
            (
                "2026-01-01T00:00:00Z",
                "2026-01-05T04:00:00Z",
                Some(("2026-01-05T04:00:00Z", 100)),
            ),
            // more than 100: capped count, still the latest
            (
                "2026-01-01T00:00:00Z",
                "2026-01-05T05:00:00Z",
                Some(("2026-01-05T05:00:00Z", 101)),
            ),
            (
                "2025-01-01T00:00:00Z",
                "2026-01-01T07:59:00Z",
                Some(("2026-01-01T07:00:00Z", 101)),
            ),
            // now before since
            ("2026-01-02T00:00:00Z", "2026-01-01T00:00:00Z", None),
        ];
        for (since, now, want) in cases {
            let got = hourly.most_recent_missed(ts(since), ts(now));
            let want = want.map(|(t, n)| (ts(t), n));
            assert_eq!(got, want, "({since}, {now}]");
        }
        // Over a DST change in Chicago with many missed: the backward search agrees.
        let s = chicago("30 1 * * *");
        assert_eq!(
            s.most_recent_missed(ts("2026-01-01T00:00:00Z"), ts("2026-11-01T07:40:00Z")),
            Some((ts("2026-11-01T06:30:00Z"), 101))
        );
        let s = chicago("30 2 * * *");
        assert_eq!(
            s.most_recent_missed(ts("2025-11-01T00:00:00Z"), ts("2026-03-08T08:10:00Z")),
            Some((ts("2026-03-08T08:00:00Z"), 101))
        );
        // An interval job inside the repeated hour: the second 01:30 (CST) is the latest.
        let s = chicago("30 * * * *");
        assert_eq!(
            s.most_recent_missed(ts("2026-10-20T00:00:00Z"), ts("2026-11-01T07:40:00Z")),
            Some((ts("2026-11-01T07:30:00Z"), 101))
        );
        assert_eq!(
            s.most_recent_missed(ts("2026-10-20T00:00:00Z"), ts("2026-11-01T07:20:00Z")),
            Some((ts("2026-11-01T06:30:00Z"), 101))
        );
        // ... and around the spring-forward gap (no 02:30 CST/CDT that night: 01:30 CST is latest).
        assert_eq!(
            s.most_recent_missed(ts("2026-03-01T00:00:00Z"), ts("2026-03-08T07:59:00Z")),
            Some((ts("2026-03-08T07:30:00Z"), 101))
        );
        assert_eq!(
            s.most_recent_missed(ts("2026-03-01T00:00:00Z"), ts("2026-03-08T08:45:00Z")),
            Some((ts("2026-03-08T08:30:00Z"), 101))
        );
    }

    struct Case {
        name: &'static str,
        expr: &'static str,
        suspend: bool,
        concurrency: ConcurrencyPolicy,
        deadline_secs: Option<u64>,
        last_scheduled: Option<&'static str>,
        created: &'static str,
        active: &'static [&'static str],
        now: &'static str,
        start: Option<&'static str>,
        stop: &'static [&'static str],
        requeue_at: Option<&'static str>,
        notes: Vec<ScheduleNote>,
    }

    const BASE: Case = Case {
        name: "",
        expr: "0 2 * * *",
        suspend: false,
        concurrency: ConcurrencyPolicy::Forbid,
        deadline_secs: None,
        last_scheduled: None,
        created: "2026-01-01T00:00:00Z",
        active: &[],
        now: "2026-01-01T01:00:00Z",
        start: None,
        stop: &[],
        requeue_at: Some("2026-01-01T02:00:00.1Z"),
        notes: Vec::new(),
    };

    #[test]
    fn decide_table() {
        // Job name of the 2026-01-01T02:00Z slot.
        let slot = "nightly-29453880";
        assert_eq!(job_name("nightly", ts("2026-01-01T02:00:00Z")), slot);
        let cases = vec![
            Case {
                name: "not yet due after creation",
                ..BASE
            },
            Case {
                name: "exactly due: first run after creation",
                now: "2026-01-01T02:00:00Z",
                start: Some("2026-01-01T02:00:00Z"),
                requeue_at: Some("2026-01-02T02:00:00.1Z"),
                ..BASE
            },
            Case {
                name: "due a little late",
                now: "2026-01-01T02:00:30Z",
                start: Some("2026-01-01T02:00:00Z"),
                requeue_at: Some("2026-01-02T02:00:00.1Z"),
                ..BASE
            },
            Case {
                name: "already ran this slot",
                last_scheduled: Some("2026-01-01T02:00:00Z"),
                now: "2026-01-01T02:00:30Z",
                requeue_at: Some("2026-01-02T02:00:00.1Z"),
                ..BASE
            },
            Case {
                name: "missed several: only the latest runs",
                last_scheduled: Some("2026-01-01T02:00:00Z"),
                now: "2026-01-05T03:00:00Z",
                start: Some("2026-01-05T02:00:00Z"),
                requeue_at: Some("2026-01-06T02:00:00.1Z"),
                ..BASE
            },
            Case {
                name: "missed within the deadline",
                deadline_secs: Some(3600),
                last_scheduled: Some("2026-01-01T02:00:00Z"),
                now: "2026-01-05T02:59:59Z",
                start: Some("2026-01-05T02:00:00Z"),
                requeue_at: Some("2026-01-06T02:00:00.1Z"),
                ..BASE
            },
            Case {
                name: "exactly at the deadline still starts",
                deadline_secs: Some(3600),
                now: "2026-01-01T03:00:00Z",
                start: Some("2026-01-01T02:00:00Z"),
                requeue_at: Some("2026-01-02T02:00:00.1Z"),
                ..BASE
            },
            Case {
                name: "missed beyond the deadline",
                deadline_secs: Some(3600),
                last_scheduled: Some("2026-01-01T02:00:00Z"),
                now: "2026-01-05T03:00:01Z",
                requeue_at: Some("2026-01-06T02:00:00.1Z"),
                notes: vec![ScheduleNote::MissSchedule {
                    scheduled: ts("2026-01-05T02:00:00Z"),
                }],
                ..BASE
            },
            Case {
                name: "suspended: nothing, no requeue",
                suspend: true,
                now: "2026-01-01T02:00:00Z",
                requeue_at: None,
                ..BASE
            },
            Case {
                name: "unsuspended later: the most recent slot runs",
                now: "2026-01-03T02:10:00Z",
                start: Some("2026-01-03T02:00:00Z"),
                requeue_at: Some("2026-01-04T02:00:00.1Z"),
                ..BASE
            },
            Case {
                name: "Forbid with an active run",
                active: &["nightly-29451000"],
                now: "2026-01-01T02:00:00Z",
                requeue_at: Some("2026-01-02T02:00:00.1Z"),
                notes: vec![ScheduleNote::JobAlreadyActive {
                    scheduled: ts("2026-01-01T02:00:00Z"),
                }],
                ..BASE
            },
            Case {
                name: "Forbid: the run ended, the slot is still due",
                now: "2026-01-01T05:00:00Z",
                start: Some("2026-01-01T02:00:00Z"),
                requeue_at: Some("2026-01-02T02:00:00.1Z"),
                ..BASE
            },
            Case {
                name: "Forbid: the run ended after the deadline",
                deadline_secs: Some(3600),
                now: "2026-01-01T05:00:00Z",
                requeue_at: Some("2026-01-02T02:00:00.1Z"),
                notes: vec![ScheduleNote::MissSchedule {
                    scheduled: ts("2026-01-01T02:00:00Z"),
                }],
                ..BASE
            },
            Case {
                name: "Replace with active runs",
                concurrency: ConcurrencyPolicy::Replace,
                active: &["nightly-29451000", "nightly-29449560"],
                now: "2026-01-01T02:00:00Z",
                start: Some("2026-01-01T02:00:00Z"),
                stop: &["nightly-29451000", "nightly-29449560"],
                requeue_at: Some("2026-01-02T02:00:00.1Z"),
                ..BASE
            },
            Case {
                name: "Replace without active runs",
                concurrency: ConcurrencyPolicy::Replace,
                now: "2026-01-01T02:00:00Z",
                start: Some("2026-01-01T02:00:00Z"),
                requeue_at: Some("2026-01-02T02:00:00.1Z"),
                ..BASE
            },
            Case {
                name: "Allow with an active run",
                concurrency: ConcurrencyPolicy::Allow,
                active: &["nightly-29451000"],
                now: "2026-01-01T02:00:00Z",
                start: Some("2026-01-01T02:00:00Z"),
                requeue_at: Some("2026-01-02T02:00:00.1Z"),
                ..BASE
            },
            Case {
                name: "this slot's run is active but unrecorded: start again to adopt, never block or stop it",
                concurrency: ConcurrencyPolicy::Replace,
                active: &["nightly-29451000", "nightly-29453880"],
                now: "2026-01-01T02:01:00Z",
                start: Some("2026-01-01T02:00:00Z"),
                requeue_at: Some("2026-01-02T02:00:00.1Z"),
                ..BASE
            },
            Case {
                name: "this slot's run is active under Forbid",
                active: &["nightly-29453880"],
                now: "2026-01-01T02:01:00Z",
                start: Some("2026-01-01T02:00:00Z"),
                requeue_at: Some("2026-01-02T02:00:00.1Z"),
                ..BASE
            },
            Case {
                name: "more than 100 missed: warn, run the latest",
                expr: "0 * * * *",
                now: "2026-01-10T00:30:00Z",
                start: Some("2026-01-10T00:00:00Z"),
                requeue_at: Some("2026-01-10T01:00:00.1Z"),
                notes: vec![ScheduleNote::TooManyMissedTimes { missed: 101 }],
                ..BASE
            },
            Case {
                name: "more than 100 missed, but the deadline narrows the window",
                expr: "0 * * * *",
                deadline_secs: Some(7200),
                now: "2026-01-10T00:30:00Z",
                start: Some("2026-01-10T00:00:00Z"),
                requeue_at: Some("2026-01-10T01:00:00.1Z"),
                ..BASE
            },
            Case {
                name: "never again (after the last representable year): no requeue",
                expr: "0 0 1 1 *",
                last_scheduled: Some("9999-01-01T00:00:00Z"),
                created: "9999-01-01T00:00:00Z",
                now: "9999-06-01T00:00:00Z",
                requeue_at: None,
                ..BASE
            },
            Case {
                name: "in Chicago: requeue at the next local 02:00",
                expr: "0 2 * * *",
                now: "2026-01-01T02:00:00Z",
                requeue_at: Some("2026-01-01T08:00:00.1Z"),
                ..BASE
            },
        ];
        for (i, case) in cases.into_iter().enumerate() {
            let schedule = if case.name.starts_with("in Chicago") {
                chicago(case.expr)
            } else {
                sched(case.expr)
            };
            let active: Vec<String> = case.active.iter().map(|s| s.to_string()).collect();
            let input = ScheduleInput {
                schedule: &schedule,
                suspend: case.suspend,
                concurrency: case.concurrency,
                starting_deadline: case.deadline_secs.map(Duration::from_secs),
                last_scheduled: case.last_scheduled.map(ts),
                created: ts(case.created),
                active: &active,
                now: ts(case.now),
            };
            let want = Decision {
                start: case.start.map(ts),
                stop: case.stop.iter().map(|s| s.to_string()).collect(),
                requeue_at: case.requeue_at.map(ts),
                notes: case.notes,
            };
            assert_eq!(decide(&input), want, "case {i}: {}", case.name);
        }
    }

    #[test]
    fn notes_have_upstream_reasons() {
        let t = ts("2026-01-01T02:00:00Z");
        let cases = [
            (
                ScheduleNote::MissSchedule { scheduled: t },
                "MissSchedule",
                true,
            ),
            (
                ScheduleNote::TooManyMissedTimes { missed: 101 },
                "TooManyMissedTimes",
                true,
            ),
            (
                ScheduleNote::JobAlreadyActive { scheduled: t },
                "JobAlreadyActive",
                false,
            ),
        ];
        for (note, reason, warning) in cases {
            assert_eq!(note.reason(), reason);
            assert_eq!(note.is_warning(), warning);
            assert!(!note.to_string().is_empty());
        }
    }

    #[test]
    fn concurrency_policy_serde() {
        assert_eq!(ConcurrencyPolicy::default(), ConcurrencyPolicy::Forbid);
        for (policy, json) in [
            (ConcurrencyPolicy::Allow, "\"Allow\""),
            (ConcurrencyPolicy::Forbid, "\"Forbid\""),
            (ConcurrencyPolicy::Replace, "\"Replace\""),
        ] {
            assert_eq!(serde_json::to_string(&policy).unwrap(), json);
            assert_eq!(
                serde_json::from_str::<ConcurrencyPolicy>(json).unwrap(),
                policy
            );
        }
    }

    #[test]
    fn job_names() {
        let t = ts("2026-01-01T02:00:00Z");
        let long = "a".repeat(52);
        let cases = [
            ("nightly", t, "nightly-29453880".to_string()),
            // Seconds within the minute do not change the name.
            (
                "nightly",
                ts("2026-01-01T02:00:59Z"),
                "nightly-29453880".to_string(),
            ),
            ("x", ts("1970-01-01T00:01:00Z"), "x-1".to_string()),
            (long.as_str(), t, format!("{long}-29453880")),
            // Longer than 52: cut (safety net), trailing '-' dropped.
            (&"b".repeat(60), t, format!("{}-29453880", "b".repeat(52))),
            (
                &format!("{}-c", "d".repeat(51)),
                t,
                format!("{}-29453880", "d".repeat(51)),
            ),
        ];
        for (export, scheduled, want) in cases {
            let name = job_name(export, scheduled);
            assert_eq!(name, want, "{export}");
            assert!(name.len() <= 63, "{name}");
        }
        // Far future still fits.
        assert!(job_name(&long, ts("9999-12-30T00:00:00Z")).len() <= 63);
    }
}
