//! Removing old runs (`output.keepRuns`) and the leftovers of runs that were killed or failed.
//! Only called while holding the export's lock.

use std::fs;
use std::path::{Path, PathBuf};

/// Run folders (`20261128T020000Z`, possibly with a `-N` suffix), oldest first.
fn run_dirs(export_dir: &Path) -> Vec<String> {
    let mut runs: Vec<String> = fs::read_dir(export_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| is_run_id(n))
        .collect();
    runs.sort();
    runs
}

fn is_run_id(name: &str) -> bool {
    let stamp = name.split('-').next().unwrap_or("");
    stamp.len() == 16
        && stamp.as_bytes()[8] == b'T'
        && stamp.ends_with('Z')
        && stamp[..8].bytes().all(|b| b.is_ascii_digit())
}

/// Keeps the newest `keep` runs and removes the rest. Returns the names removed.
pub fn remove_old_runs(export_dir: &Path, keep: usize) -> Vec<String> {
    let runs = run_dirs(export_dir);
    let excess = runs.len().saturating_sub(keep);
    let mut removed = Vec::new();
    for name in runs.into_iter().take(excess) {
        // Renamed out of the run names first: a process killed while deleting leaves a leftover
        // that the next run sweeps, never a half-deleted folder that looks like a complete run.
        let doomed = export_dir.join(format!(".{name}.removing"));
        let result =
            fs::rename(export_dir.join(&name), &doomed).and_then(|()| fs::remove_dir_all(&doomed));
        match result {
            Ok(()) => removed.push(name),
            Err(e) => tracing::warn!("cannot remove old run {name}: {e}"),
        }
    }
    removed
}

/// Removes `.<id>.partial` folders (runs that were killed) but `keep`, `.<id>.removing` folders (old
/// runs whose removal was interrupted), and `.<id>.failed` folders except the newest (kept for
/// diagnosis).
pub fn sweep_leftovers(export_dir: &Path, keep: Option<&Path>) {
    let mut failed = Vec::new();
    for entry in fs::read_dir(export_dir).into_iter().flatten().flatten() {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if keep == Some(entry.path().as_path()) {
            continue;
        }
        if name.starts_with('.') && (name.ends_with(".partial") || name.ends_with(".removing")) {
            tracing::info!("removing {name}, left by an earlier process");
            if let Err(e) = fs::remove_dir_all(entry.path()) {
                tracing::warn!("cannot remove {name}: {e}");
            }
        } else if name.starts_with('.') && name.ends_with(".failed") {
            failed.push(name);
        }
    }
    failed.sort();
    failed.pop();
    for name in failed {
        let _ = fs::remove_dir_all(export_dir.join(name));
    }
}

/// The newest `.<id>.partial` (a killed run) or `.<id>.failed` folder (a run that failed writing its
/// files) holding `marker` that `resumable` accepts: `(id, folder)`.
pub fn find_resumable(
    export_dir: &Path,
    marker: &str,
    resumable: &dyn Fn(&Path) -> bool,
) -> Option<(String, PathBuf)> {
    let mut found: Vec<(String, PathBuf)> = fs::read_dir(export_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let rest = name.strip_prefix('.')?;
            let id = rest
                .strip_suffix(".partial")
                .or_else(|| rest.strip_suffix(".failed"))?
                .to_owned();
            let path = e.path();
            (path.join(marker).is_file() && resumable(&path.join(marker))).then_some((id, path))
        })
        .collect();
    found.sort();
    found.pop()
}

/// Empties a staging folder but for the entries named in `keep`.
pub fn clear_except(dir: &Path, keep: &[&str]) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if keep.iter().any(|k| entry.file_name() == *k) {
            continue;
        }
        if entry.file_type()?.is_dir() {
            fs::remove_dir_all(entry.path())?;
        } else {
            fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids() {
        assert!(is_run_id("20261128T020000Z"));
        assert!(is_run_id("20261128T020000Z-2"));
        assert!(!is_run_id("latest"));
        assert!(!is_run_id(".20261128T020000Z.partial"));
    }

    #[test]
    fn keeps_the_newest() {
        let d = tempfile::tempdir().unwrap();
        for n in [
            "20260101T000000Z",
            "20260102T000000Z",
            "20260103T000000Z",
            "notes",
        ] {
            fs::create_dir(d.path().join(n)).unwrap();
        }
        assert_eq!(
            remove_old_runs(d.path(), 2),
            vec!["20260101T000000Z".to_string()]
        );
        assert!(d.path().join("notes").exists());
        assert!(d.path().join("20260103T000000Z").exists());
    }
}
