//! The runs of one export in a bucket, with the guarantees a folder gives locally: a run is complete
//! once its `manifest.json` is written, and `<export>/latest.json` (the run id and its manifest's
//! location) is written only after that, so a reader that starts from `latest.json` never sees a
//! partial run. Object stores have no rename: a run killed half-way leaves objects without a
//! manifest, which retention removes. Layout: `<prefix>/<export>/<run-id>/...` and
//! `<prefix>/<export>/latest.json`.

use std::sync::Arc;

use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use super::describe;

pub const MANIFEST: &str = "manifest.json";
pub const LATEST: &str = "latest.json";

/// A store operation that failed, naming the object.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {message}")]
pub struct RunsError {
    pub what: &'static str,
    pub path: String,
    pub message: String,
}

/// What `latest.json` says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Latest {
    pub run_id: String,
    /// The manifest's path in the bucket.
    pub manifest: String,
    pub published_at: String,
}

/// One run found under the export's prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunObjects {
    pub run_id: String,
    /// Whether its manifest is there (it was published).
    pub complete: bool,
}

/// The runs of one export.
pub struct ExportRuns {
    store: Arc<dyn ObjectStore>,
    /// `<prefix>/<export>`.
    base: ObjectPath,
}

fn failed(what: &'static str, path: &ObjectPath) -> impl FnOnce(object_store::Error) -> RunsError {
    let path = path.to_string();
    move |e| RunsError {
        what,
        path,
        message: describe(&e),
    }
}

/// Whether `name` looks like a run id (`20261128T020000Z`, `-2`...): other objects are never touched.
pub fn is_run_id(name: &str) -> bool {
    let (stamp, suffix) = name.split_once('-').unwrap_or((name, "1"));
    stamp.len() == 16
        && stamp.as_bytes()[8] == b'T'
        && stamp.ends_with('Z')
        && stamp[..8].bytes().all(|b| b.is_ascii_digit())
        && stamp[9..15].bytes().all(|b| b.is_ascii_digit())
        && !suffix.is_empty()
        && suffix.bytes().all(|b| b.is_ascii_digit())
}

impl ExportRuns {
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &ObjectPath, export: &str) -> ExportRuns {
        ExportRuns {
            store,
            base: prefix.clone().join(export),
        }
    }

    /// `<prefix>/<export>/<run-id>`.
    pub fn run_path(&self, run_id: &str) -> ObjectPath {
        self.base.clone().join(run_id)
    }

    async fn put(&self, path: &ObjectPath, bytes: Vec<u8>) -> Result<(), RunsError> {
        self.store
            .put(path, PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(failed("writing", path))
    }

    /// Writes the run's `manifest.json` (and any other closing objects before it, e.g. the summary),
    /// then points `latest.json` at the run.
    pub async fn publish(
        &self,
        run_id: &str,
        before_manifest: &[(&str, Vec<u8>)],
        manifest: Vec<u8>,
    ) -> Result<Latest, RunsError> {
        let run = self.run_path(run_id);
        for (name, bytes) in before_manifest {
            self.put(&run.clone().join(*name), bytes.clone()).await?;
        }
        self.put(&run.join(MANIFEST), manifest).await?;
        self.point_latest(run_id).await
    }

    /// Points `latest.json` at the run `run_id`, whose manifest is written.
    pub async fn point_latest(&self, run_id: &str) -> Result<Latest, RunsError> {
        let latest = Latest {
            run_id: run_id.to_owned(),
            manifest: self.run_path(run_id).join(MANIFEST).to_string(),
            published_at: jiff::Timestamp::now().to_string(),
        };
        let mut text = serde_json::to_vec_pretty(&latest).map_err(|e| RunsError {
            what: "writing",
            path: LATEST.into(),
            message: e.to_string(),
        })?;
        text.push(b'\n');
        self.put(&self.base.clone().join(LATEST), text).await?;
        Ok(latest)
    }

    /// Whether the folder `dir` holds the object `name`. Asked by listing, not by reading it: a policy
    /// that allows listing only under the export's prefix (`s3:prefix` condition) makes S3 answer 403,
    /// not 404, to a read of a missing object.
    async fn has_object(&self, dir: &ObjectPath, name: &str) -> Result<bool, RunsError> {
        let listed = self
            .store
            .list_with_delimiter(Some(dir))
            .await
            .map_err(failed("listing", dir))?;
        Ok(listed
            .objects
            .iter()
            .any(|o| o.location.filename() == Some(name)))
    }

    /// `<prefix>/<export>/.state/<name>`: what a run remembers for the next when its working folder
    /// does not outlive it (a pod's emptyDir). Never listed as a run.
    fn state_path(&self, name: &str) -> ObjectPath {
        self.base.clone().join(".state").join(name)
    }

    /// The state object `name`, `None` when there is none.
    pub async fn read_state(&self, name: &str) -> Result<Option<Vec<u8>>, RunsError> {
        let path = self.state_path(name);
        if !self
            .has_object(&self.base.clone().join(".state"), name)
            .await?
        {
            return Ok(None);
        }
        match self.store.get(&path).await {
            Ok(r) => Ok(Some(
                r.bytes().await.map_err(failed("reading", &path))?.to_vec(),
            )),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(failed("reading", &path)(e)),
        }
    }

    pub async fn write_state(&self, name: &str, bytes: Vec<u8>) -> Result<(), RunsError> {
        self.put(&self.state_path(name), bytes).await
    }

    pub async fn remove_state(&self, name: &str) -> Result<(), RunsError> {
        let path = self.state_path(name);
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(failed("deleting", &path)(e)),
        }
    }

    /// What `latest.json` says, `None` before the first published run.
    pub async fn latest(&self) -> Result<Option<Latest>, RunsError> {
        let path = self.base.clone().join(LATEST);
        if !self.has_object(&self.base, LATEST).await? {
            return Ok(None);
        }
        match self.store.get(&path).await {
            Ok(r) => {
                let bytes = r.bytes().await.map_err(failed("reading", &path))?;
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| RunsError {
                        what: "reading",
                        path: path.to_string(),
                        message: e.to_string(),
                    })
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(failed("reading", &path)(e)),
        }
    }

    /// The runs under the export's prefix, oldest first.
    pub async fn runs(&self) -> Result<Vec<RunObjects>, RunsError> {
        let listed = self
            .store
            .list_with_delimiter(Some(&self.base))
            .await
            .map_err(failed("listing", &self.base))?;
        let mut runs = Vec::new();
        for prefix in listed.common_prefixes {
            let Some(id) = prefix.filename().filter(|n| is_run_id(n)) else {
                continue;
            };
            let complete = self.has_object(&prefix, MANIFEST).await?;
            runs.push(RunObjects {
                run_id: id.to_owned(),
                complete,
            });
        }
        runs.sort_by(|a, b| a.run_id.cmp(&b.run_id));
        Ok(runs)
    }

    /// Keeps the newest `keep` complete runs and the run `current` (in progress); removes every other
    /// run, complete or left half-way by a killed run. Returns the run ids removed.
    pub async fn remove_old_runs(
        &self,
        keep: usize,
        current: Option<&str>,
    ) -> Result<Vec<String>, RunsError> {
        let runs = self.runs().await?;
        let latest = self.latest().await?.map(|l| l.run_id);
        let complete: Vec<&RunObjects> = runs.iter().filter(|r| r.complete).collect();
        let kept: Vec<&str> = complete
            .iter()
            .rev()
            .take(keep.max(1))
            .map(|r| r.run_id.as_str())
            .collect();
        let mut removed = Vec::new();
        for run in &runs {
            let id = run.run_id.as_str();
            if kept.contains(&id) || Some(id) == current || latest.as_deref() == Some(id) {
                continue;
            }
            self.remove_run(id).await?;
            removed.push(id.to_owned());
        }
        Ok(removed)
    }

    /// Deletes every object of a run, its manifest first (so that it stops counting as complete).
    async fn remove_run(&self, run_id: &str) -> Result<(), RunsError> {
        let run = self.run_path(run_id);
        let manifest = run.clone().join(MANIFEST);
        match self.store.delete(&manifest).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(failed("deleting", &manifest)(e)),
        }
        let objects: Vec<ObjectPath> = self
            .store
            .list(Some(&run))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(failed("listing", &run))?;
        for path in objects {
            match self.store.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(failed("deleting", &path)(e)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    async fn put(store: &Arc<dyn ObjectStore>, path: &str) {
        store
            .put(&ObjectPath::from(path), PutPayload::from_static(b"{}\n"))
            .await
            .unwrap();
    }

    #[test]
    fn run_ids() {
        assert!(is_run_id("20261128T020000Z"));
        assert!(is_run_id("20261128T020000Z-2"));
        assert!(!is_run_id("latest.json"));
        assert!(!is_run_id("20261128T020000Z-"));
        assert!(!is_run_id("2026112XT020000Z"));
    }

    #[tokio::test]
    async fn latest_only_after_the_manifest_and_retention_removes_the_rest() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let runs = ExportRuns::new(store.clone(), &ObjectPath::from("exports"), "nightly");
        assert_eq!(runs.latest().await.unwrap(), None);
        for id in ["20261101T020000Z", "20261102T020000Z", "20261103T020000Z"] {
            put(&store, &format!("exports/nightly/{id}/Patient.ndjson")).await;
            let latest = runs
                .publish(id, &[("summary.json", b"{}".to_vec())], b"{}".to_vec())
                .await
                .unwrap();
            assert_eq!(
                latest.manifest,
                format!("exports/nightly/{id}/manifest.json")
            );
        }
        // A killed run: objects, no manifest. Objects that are not runs are left alone.
        put(&store, "exports/nightly/20261104T020000Z/Patient.ndjson").await;
        put(&store, "exports/nightly/notes/readme.txt").await;
        let all = runs.runs().await.unwrap();
        assert_eq!(all.len(), 4);
        assert!(!all[3].complete && all[2].complete);
        assert_eq!(
            runs.latest().await.unwrap().unwrap().run_id,
            "20261103T020000Z",
            "latest never names the half-written run"
        );
        let removed = runs.remove_old_runs(2, None).await.unwrap();
        assert_eq!(removed, ["20261101T020000Z", "20261104T020000Z"]);
        let left: Vec<String> = runs
            .runs()
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.run_id)
            .collect();
        assert_eq!(left, ["20261102T020000Z", "20261103T020000Z"]);
        assert!(
            store
                .head(&ObjectPath::from("exports/nightly/notes/readme.txt"))
                .await
                .is_ok()
        );
        // The run in progress is kept even without its manifest.
        put(&store, "exports/nightly/20261105T020000Z/Patient.ndjson").await;
        let removed = runs
            .remove_old_runs(1, Some("20261105T020000Z"))
            .await
            .unwrap();
        assert_eq!(removed, ["20261102T020000Z"]);
    }
}
