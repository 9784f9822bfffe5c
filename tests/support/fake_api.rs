//! An in-process fake Kubernetes API server for tests.
//!
//! [`FakeApi::client`] returns a real `kube::Client` whose transport is a `tower::service_fn` serving
//! requests from an in-memory store, so `kube::Api`, `kube::runtime::watcher`/`Controller`, the events
//! `Recorder` and Lease-based leader election run unmodified against it. Tests can also read and write
//! the store directly ([`FakeApi::get`], [`FakeApi::put`], ...), inspect the request log, play the
//! Job controller's part with [`FakeApi::finish_job`], and give a component a client that RBAC-like
//! refuses some requests with 403 ([`FakeApi::client_forbidding`]).
//!
//! Modelled like the real API server:
//! - paths `/api/v1/...` and `/apis/{group}/{version}/...`, optionally `namespaces/{ns}/`, then
//!   `{plural}[/{name}[/{subresource}]]`, for any plural; a collection without a namespace spans all;
//! - one global resourceVersion counter; uid, creationTimestamp and generation (1 on create, +1 when
//!   `.spec` changes) are owned by the server; a write that changes nothing keeps the resourceVersion
//!   and emits no watch event (tests use that to catch hot loops);
//! - LIST with label selectors (`k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a,b)`) and
//!   field selectors (`metadata.name=x`, any dotted path, `=`/`==`/`!=`); `limit`/`continue` are
//!   ignored (everything comes in one page);
//! - WATCH from a resourceVersion replays the (unbounded) change history after it, then follows live
//!   changes, and ends after `timeoutSeconds`; from `0`/empty it starts with ADDED for every object.
//!   No BOOKMARK events are sent;
//! - status subresource for pods, jobs, epicexports (and a few other built-in kinds): the main
//!   endpoint ignores `.status` (also on create), `/status` changes only `.status`;
//! - optimistic concurrency: PUT, PATCH and DELETE preconditions with a stale resourceVersion get 409;
//! - finalizers: DELETE of an object with finalizers only sets `deletionTimestamp`; it goes away once
//!   an update empties `metadata.finalizers`;
//! - garbage collection on delete: objects whose ownerReferences point at the deleted uid are deleted
//!   (recursively), and so are pods labelled `job-name=<job>` of a deleted Job. Like the real server,
//!   a Job deleted through the API without a `propagationPolicy` orphans its pods; `Foreground` is
//!   treated as `Background` (dependents go immediately, not before the owner).
//!
//! Approximations:
//! - strategic merge patch is a JSON merge patch (lists are replaced, not merged by key);
//! - server-side apply merges the sent fields into the object like a merge patch (no field ownership:
//!   fields omitted from a later apply are kept, conflicts are never reported, `force` is ignored);
//!   an apply to a missing object creates it; an apply to `/status` replaces the whole `.status` with
//!   the one sent;
//! - no defaulting, validation, admission, managedFields, metadata-only (`as=PartialObjectMetadata`)
//!   responses or 410 Gone; `generation` is kept for every kind.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::{Body as RespBody, Bytes};
use futures::StreamExt;
use serde_json::{Map, Value, json};
use tokio::sync::watch;

/// Store key: (collection, namespace or "" for cluster-scoped objects, name).
type Key = (String, String, String);
type Reply = Result<(u16, Value), Value>;

/// A request as received, in order of arrival.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// Path without the query, e.g. `/apis/batch/v1/namespaces/phi/jobs/nightly`.
    pub path: String,
    /// Raw (still percent-encoded) query string, possibly empty.
    pub query: String,
}

impl Request {
    /// The Kubernetes verb: get, list, watch, create, update, patch, delete, deletecollection.
    pub fn verb(&self) -> &'static str {
        let item = Target::parse(&self.path).is_some_and(|t| t.name.is_some());
        match (self.method.as_str(), item) {
            ("GET", true) => "get",
            ("GET", false) if matches!(self.param("watch").as_deref(), Some("true" | "1")) => {
                "watch"
            }
            ("GET", false) => "list",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("DELETE", true) => "delete",
            ("DELETE", false) => "deletecollection",
            _ => "unknown",
        }
    }

    /// A decoded query parameter.
    pub fn param(&self, name: &str) -> Option<String> {
        url::form_urlencoded::parse(self.query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }
}

/// One entry of the change history, which is what watches stream.
struct Change {
    rv: u64,
    collection: String,
    ns: String,
    kind: &'static str,
    object: Value,
}

struct State {
    objects: BTreeMap<Key, Value>,
    rv: u64,
    history: Vec<Change>,
    log: Vec<Request>,
    /// Requests refused with 403 by a [`FakeApi::client_forbidding`] client.
    forbidden: Vec<Request>,
}

/// The fake API server; clones share the same store.
#[derive(Clone)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
    /// Pinged after every mutation; watch streams wait on it and then read the history.
    changed: Arc<watch::Sender<()>>,
}

impl Default for FakeApi {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeApi {
    pub fn new() -> FakeApi {
        let state = State {
            objects: BTreeMap::new(),
            rv: 1,
            history: Vec::new(),
            log: Vec::new(),
            forbidden: Vec::new(),
        };
        FakeApi {
            state: Arc::new(Mutex::new(state)),
            changed: Arc::new(watch::channel(()).0),
        }
    }

    /// A `kube::Client` (default namespace "default") talking to this fake.
    pub fn client(&self) -> kube::Client {
        let fake = self.clone();
        let service = tower::service_fn(move |req| fake.clone().handle(req));
        kube::Client::new(service, "default")
    }

    /// A `kube::Client` whose requests matching `forbidden` are refused with 403 Forbidden, as RBAC
    /// would refuse them, without reaching the store (they are recorded in [`FakeApi::forbidden`]).
    pub fn client_forbidding(
        &self,
        forbidden: impl Fn(&Request) -> bool + Send + Sync + 'static,
    ) -> kube::Client {
        let fake = self.clone();
        let forbidden = Arc::new(forbidden);
        let service = tower::service_fn(move |req: http::Request<kube::client::Body>| {
            let (fake, forbidden) = (fake.clone(), forbidden.clone());
            async move {
                let request = Request {
                    method: req.method().as_str().to_owned(),
                    path: req.uri().path().to_owned(),
                    query: req.uri().query().unwrap_or_default().to_owned(),
                };
                if forbidden(&request) {
                    let message = format!(
                        "{} {} is forbidden (test RBAC)",
                        request.method, request.path
                    );
                    fake.lock().forbidden.push(request);
                    return Ok::<_, Infallible>(respond(Err(status(403, "Forbidden", &message))));
                }
                fake.handle(req).await
            }
        });
        kube::Client::new(service, "default")
    }

    /// The requests a [`FakeApi::client_forbidding`] client had refused.
    pub fn forbidden(&self) -> Vec<Request> {
        self.lock().forbidden.clone()
    }

    /// Serves this fake over real HTTP on `listener` (for a separate process, such as the real
    /// `epic-export controller` with a kubeconfig pointing here), until the task is dropped.
    pub async fn serve_http(&self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        let fake = self.clone();
        let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
            let fake = fake.clone();
            async move {
                let (parts, body) = req.into_parts();
                let bytes = axum::body::to_bytes(body, usize::MAX)
                    .await
                    .unwrap_or_default();
                let req =
                    http::Request::from_parts(parts, kube::client::Body::from(bytes.to_vec()));
                match fake.handle(req).await {
                    Ok(resp) => resp,
                    Err(never) => match never {},
                }
            }
        });
        axum::serve(listener, app).await
    }

    /// The object, read directly from the store (not logged).
    pub fn get(&self, collection: &str, ns: &str, name: &str) -> Option<Value> {
        self.lock().objects.get(&key(collection, ns, name)).cloned()
    }

    /// The objects of a collection, in one namespace or (None) all of them (not logged).
    pub fn list(&self, collection: &str, ns: Option<&str>) -> Vec<Value> {
        let collection = collection.trim_matches('/');
        self.lock()
            .objects
            .iter()
            .filter(|((c, n, _), _)| c == collection && ns.is_none_or(|ns| ns == n))
            .map(|(_, o)| o.clone())
            .collect()
    }

    /// Creates or replaces the object (namespace and name from its metadata) as the server would,
    /// keeping whatever `.status` it has; returns the stored object. Not logged.
    pub fn put(&self, collection: &str, mut obj: Value) -> Value {
        let collection = collection.trim_matches('/');
        fill_type_meta(collection, &mut obj);
        self.mutate(|st| st.store(collection, obj))
    }

    /// Deletes the object with background propagation (finalizers are honoured). Not logged.
    pub fn delete(&self, collection: &str, ns: &str, name: &str) {
        self.mutate(|st| st.remove(&key(collection, ns, name), true));
    }

    /// The current (global) resourceVersion; it only moves when something really changed.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Request> {
        self.lock().log.clone()
    }

    /// Non-GET requests received after the first `mark` requests (take `requests().len()` as a mark).
    pub fn writes_since(&self, mark: usize) -> Vec<Request> {
        let st = self.lock();
        st.log
            .iter()
            .skip(mark)
            .filter(|r| r.method != "GET")
            .cloned()
            .collect()
    }

    /// Plays the Job controller: the Job has started (`startTime`, `active: 1`).
    pub fn start_job(&self, ns: &str, job: &str) {
        self.mutate(|st| {
            let mut obj = st.job(ns, job);
            let status = object_at(&mut obj, "status");
            status.entry("startTime").or_insert_with(|| now().into());
            status.insert("active".into(), 1.into());
            st.store(JOBS, obj);
        });
    }

    /// Plays the Job and kubelet controllers: the Job's pod ran to completion. Creates a pod
    /// `<job>-xxxxx` (labelled and owned like the Job controller does) whose container terminated
    /// with `termination_message`, and marks the Job Complete or Failed (with the Kubernetes ≥ 1.31
    /// `SuccessCriteriaMet`/`FailureTarget` conditions).
    pub fn finish_job(&self, ns: &str, job: &str, succeeded: bool, termination_message: &str) {
        self.mutate(|st| {
            let mut obj = st.job(ns, job);
            let uid = obj["metadata"]["uid"].clone();
            let now = now();
            let started = obj["status"]["startTime"].as_str().unwrap_or(&now).to_owned();
            let template = &obj["spec"]["template"];
            let mut labels = template["metadata"]["labels"].as_object().cloned().unwrap_or_default();
            for (k, v) in [
                ("job-name", json!(job)),
                ("batch.kubernetes.io/job-name", json!(job)),
                ("controller-uid", uid.clone()),
                ("batch.kubernetes.io/controller-uid", uid.clone()),
            ] {
                labels.insert(k.into(), v);
            }
            let mut spec = template["spec"].clone();
            if spec["containers"].as_array().is_none_or(Vec::is_empty) {
                spec = json!({"containers": [{"name": "export", "image": "epic-export"}]});
            }
            let container = spec["containers"][0].clone();
            let (phase, exit_code, reason) =
                if succeeded { ("Succeeded", 0, "Completed") } else { ("Failed", 1, "Error") };
            let pod = json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": format!("{job}-{}", random_suffix()),
                    "namespace": ns,
                    "labels": labels,
                    "ownerReferences": [{
                        "apiVersion": "batch/v1", "kind": "Job", "name": job, "uid": uid,
                        "controller": true, "blockOwnerDeletion": true,
                    }],
                },
                "spec": spec,
                "status": {
                    "phase": phase,
                    "startTime": started,
                    "containerStatuses": [{
                        "name": container["name"].as_str().unwrap_or("export"),
                        "image": container["image"].as_str().unwrap_or("epic-export"),
                        "imageID": "",
                        "ready": false,
                        "started": false,
                        "restartCount": 0,
                        "state": {"terminated": {
                            "exitCode": exit_code, "reason": reason, "message": termination_message,
                            "startedAt": started, "finishedAt": now,
                        }},
                    }],
                },
            });
            st.store("api/v1/pods", pod);

            let condition = |type_: &str, reason: &str, message: &str| {
                json!({"type": type_, "status": "True", "lastProbeTime": now, "lastTransitionTime": now,
                       "reason": reason, "message": message})
            };
            let status = object_at(&mut obj, "status");
            status.insert("startTime".into(), started.clone().into());
            status.remove("active");
            status.insert("ready".into(), 0.into());
            status.insert("terminating".into(), 0.into());
            let conditions = if succeeded {
                status.insert("succeeded".into(), 1.into());
                status.insert("completionTime".into(), now.clone().into());
                vec![
                    condition("SuccessCriteriaMet", "CompletionsReached", "Reached expected number of succeeded pods"),
                    condition("Complete", "CompletionsReached", "Reached expected number of succeeded pods"),
                ]
            } else {
                status.insert("failed".into(), 1.into());
                vec![
                    condition("FailureTarget", "BackoffLimitExceeded", "Job has reached the specified backoff limit"),
                    condition("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit"),
                ]
            };
            status.insert("conditions".into(), conditions.into());
            st.store(JOBS, obj);
        });
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs a change under the lock, then wakes the watches (spurious wake-ups are harmless).
    fn mutate<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let result = f(&mut self.lock());
        self.changed.send_replace(());
        result
    }

    async fn handle(
        self,
        req: http::Request<kube::client::Body>,
    ) -> Result<http::Response<RespBody>, Infallible> {
        let (parts, body) = req.into_parts();
        let body = body.collect_bytes().await.unwrap_or_default();
        let request = Request {
            method: parts.method.as_str().to_owned(),
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().unwrap_or_default().to_owned(),
        };
        let content_type = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let content_type = content_type.unwrap_or_default().to_owned();
        self.lock().log.push(request.clone());

        if request.path == "/version" {
            return Ok(respond(Ok((200, version_info()))));
        }
        let Some(target) = Target::parse(&request.path) else {
            let message = format!(
                "the server could not find the requested resource ({})",
                request.path
            );
            return Ok(respond(Err(status(404, "NotFound", &message))));
        };
        let reply = match (request.method.as_str(), target.name.is_some()) {
            ("GET", false) if request.verb() == "watch" => return Ok(self.watch(&target, &request)),
            ("GET", false) => Ok((200, self.lock().list(&target, &request))),
            ("GET", true) => self
                .lock()
                .objects
                .get(&target.key())
                .cloned()
                .map(|o| (200, o))
                .ok_or_else(|| target.not_found()),
            ("POST", false) => {
                parse(&body).and_then(|obj| self.mutate(|st| st.create(&target, obj)))
            }
            ("PUT", true) => {
                parse(&body).and_then(|obj| self.mutate(|st| st.replace(&target, obj)))
            }
            ("PATCH", true) => parse(&body)
                .and_then(|patch| self.mutate(|st| st.patch(&target, &content_type, patch))),
            ("DELETE", true) => self.mutate(|st| st.delete(&target, &request, &body)),
            ("DELETE", false) => Ok((
                200,
                self.mutate(|st| st.delete_collection(&target, &request)),
            )),
            _ => Err(status(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            )),
        };
        Ok(respond(reply))
    }

    /// A streaming watch response: newline-delimited watch events, ended after `timeoutSeconds`.
    fn watch(&self, target: &Target, req: &Request) -> http::Response<RespBody> {
        let filter = Filter::new(target, req);
        let since = req.param("resourceVersion").unwrap_or_default();
        let timeout = req
            .param("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .unwrap_or(290);
        let mut rx = self.changed.subscribe();
        let (initial, cursor) = {
            rx.borrow_and_update();
            let st = self.lock();
            match since.parse::<u64>() {
                // "Any version": start with the current objects as ADDED, then follow changes.
                Err(_) | Ok(0) => {
                    let objects = st
                        .objects
                        .iter()
                        .filter(|(k, o)| filter.matches(&k.0, &k.1, o));
                    let lines: String = objects.map(|(_, o)| event_line("ADDED", o)).collect();
                    (lines, st.history.len())
                }
                Ok(rv) => (String::new(), st.history.partition_point(|c| c.rv <= rv)),
            }
        };
        let state = self.state.clone();
        let stream = futures::stream::unfold(
            (cursor, rx, initial),
            move |(mut cursor, mut rx, pending)| {
                let state = state.clone();
                let filter = filter.clone();
                async move {
                    let mut lines = pending;
                    while lines.is_empty() {
                        // Mark the current ping as seen before reading, so a change racing with the read
                        // still wakes us up.
                        rx.borrow_and_update();
                        {
                            let st = state.lock().unwrap_or_else(|e| e.into_inner());
                            let changes = st.history[cursor..].iter();
                            let changes =
                                changes.filter(|c| filter.matches(&c.collection, &c.ns, &c.object));
                            lines = changes.map(|c| event_line(c.kind, &c.object)).collect();
                            cursor = st.history.len();
                        }
                        if lines.is_empty() && rx.changed().await.is_err() {
                            return None;
                        }
                    }
                    Some((
                        Ok::<_, Infallible>(Bytes::from(lines)),
                        (cursor, rx, String::new()),
                    ))
                }
            },
        );
        let stream = stream.take_until(tokio::time::sleep(Duration::from_secs(timeout)));
        http::Response::builder()
            .status(200)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(RespBody::from_stream(stream))
            .unwrap()
    }
}

const JOBS: &str = "apis/batch/v1/jobs";

impl State {
    /// Writes `obj` (namespace and name from its metadata) as the API server would: keeps the
    /// server-owned metadata, bumps generation when `.spec` changed, and — unless nothing changed —
    /// bumps the resourceVersion and records a watch event. Returns the stored object.
    fn store(&mut self, collection: &str, mut obj: Value) -> Value {
        let meta = object_at(&mut obj, "metadata");
        let ns = meta
            .get("namespace")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let name = meta.get("name").and_then(Value::as_str).unwrap_or_default();
        let key = key(collection, ns, name);
        let old = self.objects.get(&key);
        match old {
            Some(old) => {
                let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
                let generation = generation + i64::from(old.get("spec") != obj.get("spec"));
                let meta = object_at(&mut obj, "metadata");
                for field in [
                    "uid",
                    "creationTimestamp",
                    "deletionTimestamp",
                    "deletionGracePeriodSeconds",
                ] {
                    match old["metadata"].get(field) {
                        Some(v) => meta.insert(field.into(), v.clone()),
                        None if field.starts_with("deletion") => None, // may be set (by `remove`)
                        None => meta.remove(field),
                    };
                }
                meta.insert("generation".into(), generation.into());
                if comparable(old) == comparable(&obj) {
                    return old.clone();
                }
            }
            None => {
                meta.insert("uid".into(), uuid::Uuid::new_v4().to_string().into());
                meta.insert("creationTimestamp".into(), now().into());
                meta.insert("generation".into(), 1.into());
            }
        }
        let kind = if old.is_some() { "MODIFIED" } else { "ADDED" };
        self.rv += 1;
        object_at(&mut obj, "metadata")
            .insert("resourceVersion".into(), self.rv.to_string().into());
        self.objects.insert(key.clone(), obj.clone());
        self.record(kind, &key, &obj);
        let finalized = obj["metadata"]["finalizers"]
            .as_array()
            .is_none_or(Vec::is_empty);
        if finalized && obj["metadata"].get("deletionTimestamp").is_some() {
            self.remove(&key, true);
        }
        obj
    }

    /// Deletes an object: with finalizers, only marks it (deletionTimestamp); otherwise removes it,
    /// records DELETED and, when `cascade`, deletes its dependents. Returns the object (None if absent).
    fn remove(&mut self, key: &Key, cascade: bool) -> Option<Value> {
        let mut obj = self.objects.get(key)?.clone();
        if obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty())
        {
            let meta = object_at(&mut obj, "metadata");
            if meta.contains_key("deletionTimestamp") {
                return Some(obj);
            }
            meta.insert("deletionTimestamp".into(), now().into());
            meta.insert("deletionGracePeriodSeconds".into(), 0.into());
            return Some(self.store(&key.0, obj));
        }
        self.objects.remove(key);
        self.rv += 1;
        object_at(&mut obj, "metadata")
            .insert("resourceVersion".into(), self.rv.to_string().into());
        self.record("DELETED", key, &obj);
        if cascade {
            let uid = obj["metadata"]["uid"].clone();
            let dependents: Vec<Key> = self
                .objects
                .iter()
                .filter(|(k, o)| {
                    let owned = o["metadata"]["ownerReferences"]
                        .as_array()
                        .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid));
                    let job_pod = key.0 == JOBS
                        && k.0 == "api/v1/pods"
                        && k.1 == key.1
                        && o["metadata"]["labels"]["job-name"].as_str() == Some(key.2.as_str());
                    owned || job_pod
                })
                .map(|(k, _)| k.clone())
                .collect();
            for dependent in dependents {
                self.remove(&dependent, true);
            }
        }
        Some(obj)
    }

    fn record(&mut self, kind: &'static str, key: &Key, obj: &Value) {
        let (collection, ns) = (key.0.clone(), key.1.clone());
        self.history.push(Change {
            rv: self.rv,
            collection,
            ns,
            kind,
            object: obj.clone(),
        });
    }

    fn list(&self, target: &Target, req: &Request) -> Value {
        let filter = Filter::new(target, req);
        let items: Vec<Value> = self
            .objects
            .iter()
            .filter(|(k, o)| filter.matches(&k.0, &k.1, o))
            .map(|(_, o)| o.clone())
            .collect();
        json!({
            "kind": format!("{}List", kind_of(&target.plural)),
            "apiVersion": api_version(&target.collection),
            "metadata": {"resourceVersion": self.rv.to_string()},
            "items": items,
        })
    }

    fn create(&mut self, target: &Target, mut obj: Value) -> Reply {
        fill_type_meta(&target.collection, &mut obj);
        let meta = object_at(&mut obj, "metadata");
        if let Some(ns) = &target.ns {
            meta.insert("namespace".into(), ns.clone().into());
        }
        meta.remove("resourceVersion");
        let ns = meta
            .get("namespace")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let mut name = meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        if let Some(prefix) = meta
            .get("generateName")
            .and_then(Value::as_str)
            .filter(|_| name.is_empty())
        {
            name = loop {
                let candidate = format!("{prefix}{}", random_suffix());
                if !self
                    .objects
                    .contains_key(&key(&target.collection, &ns, &candidate))
                {
                    break candidate;
                }
            };
            meta.insert("name".into(), name.clone().into());
        }
        if name.is_empty() {
            return Err(status(422, "Invalid", "name or generateName is required"));
        }
        if self
            .objects
            .contains_key(&key(&target.collection, &ns, &name))
        {
            let message = format!("{} \"{name}\" already exists", target.resource());
            return Err(status(409, "AlreadyExists", &message));
        }
        if has_status_subresource(&target.plural) {
            obj.as_object_mut().unwrap().remove("status");
        }
        Ok((201, self.store(&target.collection, obj)))
    }

    fn replace(&mut self, target: &Target, mut obj: Value) -> Reply {
        let old = self
            .objects
            .get(&target.key())
            .cloned()
            .ok_or_else(|| target.not_found())?;
        check_resource_version(&old, obj["metadata"]["resourceVersion"].as_str())?;
        let obj = if target.sub.as_deref() == Some("status") {
            with_status_of(old, &obj)
        } else {
            if has_status_subresource(&target.plural) {
                obj = with_status_of(obj, &old);
            }
            obj
        };
        Ok((200, self.store_at(target, obj)))
    }

    fn patch(&mut self, target: &Target, content_type: &str, patch: Value) -> Reply {
        let apply = content_type.starts_with("application/apply-patch");
        let to_status = target.sub.as_deref() == Some("status");
        let Some(old) = self.objects.get(&target.key()).cloned() else {
            if !apply || to_status {
                return Err(target.not_found());
            }
            let mut obj = patch;
            object_at(&mut obj, "metadata").insert("name".into(), target.name.clone().into());
            return self.create(target, obj);
        };
        check_resource_version(&old, patch["metadata"]["resourceVersion"].as_str())?;
        let mut obj = old.clone();
        match content_type.split(';').next().unwrap_or_default().trim() {
            "application/apply-patch+yaml" if to_status => obj = with_status_of(obj, &patch),
            "application/merge-patch+json"
            | "application/strategic-merge-patch+json"
            | "application/apply-patch+yaml" => json_patch::merge(&mut obj, &patch),
            "application/json-patch+json" => {
                // kube-runtime emits `test` ops with a null value for paths that may be absent; the
                // real server accepts those, json_patch would fail them.
                let ops: Vec<Value> = patch.as_array().cloned().unwrap_or_default();
                let ops = ops.into_iter().filter(|op| {
                    let path = op["path"].as_str().unwrap_or_default();
                    !(op["op"] == "test" && op["value"].is_null() && obj.pointer(path).is_none())
                });
                let ops: json_patch::Patch = serde_json::from_value(Value::Array(ops.collect()))
                    .map_err(|e| status(400, "BadRequest", &e.to_string()))?;
                json_patch::patch(&mut obj, &ops.0)
                    .map_err(|e| status(422, "Invalid", &e.to_string()))?;
            }
            other => {
                return Err(status(
                    415,
                    "UnsupportedMediaType",
                    &format!("unsupported patch type {other}"),
                ));
            }
        }
        let obj = if to_status {
            with_status_of(old, &obj)
        } else if has_status_subresource(&target.plural) {
            with_status_of(obj, &old)
        } else {
            obj
        };
        Ok((200, self.store_at(target, obj)))
    }

    fn delete(&mut self, target: &Target, req: &Request, body: &[u8]) -> Reply {
        let options: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let old = self
            .objects
            .get(&target.key())
            .ok_or_else(|| target.not_found())?;
        check_resource_version(old, options["preconditions"]["resourceVersion"].as_str())?;
        if let Some(uid) = options["preconditions"]["uid"]
            .as_str()
            .filter(|u| old["metadata"]["uid"] != *u)
        {
            return Err(status(
                409,
                "Conflict",
                &format!("precondition failed: UID in precondition: {uid}"),
            ));
        }
        let policy = options["propagationPolicy"]
            .as_str()
            .map(str::to_owned)
            .or_else(|| req.param("propagationPolicy"));
        // Like the real server, Jobs deleted through the REST API orphan their pods by default.
        let default = if target.plural == "jobs" {
            "Orphan"
        } else {
            "Background"
        };
        let cascade = policy.as_deref().unwrap_or(default) != "Orphan";
        let obj = self.remove(&target.key(), cascade).expect("checked above");
        Ok((200, obj))
    }

    fn delete_collection(&mut self, target: &Target, req: &Request) -> Value {
        let filter = Filter::new(target, req);
        let keys: Vec<Key> = self
            .objects
            .iter()
            .filter(|(k, o)| filter.matches(&k.0, &k.1, o))
            .map(|(k, _)| k.clone())
            .collect();
        let items: Vec<Value> = keys.iter().filter_map(|k| self.remove(k, true)).collect();
        json!({"kind": format!("{}List", kind_of(&target.plural)), "apiVersion": api_version(&target.collection),
               "metadata": {"resourceVersion": self.rv.to_string()}, "items": items})
    }

    /// Stores `obj` under the name and namespace of the request path.
    fn store_at(&mut self, target: &Target, mut obj: Value) -> Value {
        fill_type_meta(&target.collection, &mut obj);
        let meta = object_at(&mut obj, "metadata");
        meta.insert("name".into(), target.name.clone().into());
        match &target.ns {
            Some(ns) => meta.insert("namespace".into(), ns.clone().into()),
            None => meta.remove("namespace"),
        };
        self.store(&target.collection, obj)
    }

    fn job(&self, ns: &str, job: &str) -> Value {
        let found = self.objects.get(&key(JOBS, ns, job)).cloned();
        found.unwrap_or_else(|| panic!("fake API: no Job {ns}/{job}"))
    }
}

/// What a request path addresses.
#[derive(Clone, Debug)]
struct Target {
    /// e.g. `apis/batch/v1/jobs`: the path up to the plural, without `namespaces/{ns}`.
    collection: String,
    plural: String,
    ns: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

impl Target {
    fn parse(path: &str) -> Option<Target> {
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let prefix_len = match segments.first() {
            Some(&"api") => 2,
            Some(&"apis") => 3,
            _ => return None,
        };
        let (prefix, mut rest) = segments.split_at_checked(prefix_len)?;
        let mut ns = None;
        if rest.len() >= 3 && rest[0] == "namespaces" {
            ns = Some(rest[1].to_owned());
            rest = &rest[2..];
        }
        let (plural, rest) = rest.split_first()?;
        if rest.len() > 2 {
            return None;
        }
        Some(Target {
            collection: format!("{}/{plural}", prefix.join("/")),
            plural: (*plural).to_owned(),
            ns,
            name: rest.first().map(|s| (*s).to_owned()),
            sub: rest.get(1).map(|s| (*s).to_owned()),
        })
    }

    fn key(&self) -> Key {
        key(
            &self.collection,
            self.ns.as_deref().unwrap_or_default(),
            self.name.as_deref().unwrap_or_default(),
        )
    }

    /// `jobs.batch` style resource name, as used in Status messages.
    fn resource(&self) -> String {
        match api_version(&self.collection).split_once('/') {
            Some((group, _)) => format!("{}.{group}", self.plural),
            None => self.plural.clone(),
        }
    }

    fn not_found(&self) -> Value {
        let message = format!(
            "{} \"{}\" not found",
            self.resource(),
            self.name.as_deref().unwrap_or_default()
        );
        status(404, "NotFound", &message)
    }
}

/// Which objects a list or watch sees: collection, namespace, label and field selectors.
#[derive(Clone)]
struct Filter {
    collection: String,
    ns: Option<String>,
    labels: String,
    fields: String,
}

impl Filter {
    fn new(target: &Target, req: &Request) -> Filter {
        Filter {
            collection: target.collection.clone(),
            ns: target.ns.clone(),
            labels: req.param("labelSelector").unwrap_or_default(),
            fields: req.param("fieldSelector").unwrap_or_default(),
        }
    }

    fn matches(&self, collection: &str, ns: &str, obj: &Value) -> bool {
        collection == self.collection
            && self.ns.as_deref().is_none_or(|n| n == ns)
            && labels_match(&self.labels, obj)
            && fields_match(&self.fields, obj)
    }
}

fn labels_match(selector: &str, obj: &Value) -> bool {
    let label = |k: &str| obj["metadata"]["labels"][k.trim()].as_str();
    let set = |s: &str| -> Vec<String> {
        s.trim()
            .trim_start_matches('(')
            .trim_end_matches(')')
            .split(',')
            .map(|v| v.trim().to_owned())
            .collect()
    };
    split_terms(selector).iter().all(|term| {
        let term = term.trim();
        if term.is_empty() {
            true
        } else if let Some((k, v)) = term.split_once("!=") {
            label(k) != Some(v.trim())
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            label(k) == Some(v.trim())
        } else if let Some((k, values)) = term.split_once(" notin ") {
            label(k).is_none_or(|l| !set(values).iter().any(|v| v == l))
        } else if let Some((k, values)) = term.split_once(" in ") {
            label(k).is_some_and(|l| set(values).iter().any(|v| v == l))
        } else if let Some(k) = term.strip_prefix('!') {
            label(k).is_none()
        } else {
            label(term).is_some()
        }
    })
}

/// Splits a selector at the commas outside parentheses.
fn split_terms(selector: &str) -> Vec<&str> {
    let (mut terms, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&selector[start..]);
    terms
}

/// Field selectors on any dotted path (`metadata.name=x`, `status.phase!=Running`).
fn fields_match(selector: &str, obj: &Value) -> bool {
    selector
        .split(',')
        .filter(|t| !t.trim().is_empty())
        .all(|term| {
            let (path, value, negate) = match term.split_once("!=") {
                Some((p, v)) => (p, v, true),
                None => match term.split_once("==").or_else(|| term.split_once('=')) {
                    Some((p, v)) => (p, v, false),
                    None => return false,
                },
            };
            let pointer = format!("/{}", path.trim().replace('.', "/"));
            let actual = match obj.pointer(&pointer) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(other) => other.to_string(),
            };
            (actual == value.trim()) != negate
        })
}

fn key(collection: &str, ns: &str, name: &str) -> Key {
    (
        collection.trim_matches('/').to_owned(),
        ns.to_owned(),
        name.to_owned(),
    )
}

/// The object as compared for "did anything change": without resourceVersion and managedFields.
fn comparable(obj: &Value) -> Value {
    let mut obj = obj.clone();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
        meta.remove("managedFields");
    }
    obj
}

/// `obj` with its `.status` replaced by the one of `from` (or removed if `from` has none).
fn with_status_of(mut obj: Value, from: &Value) -> Value {
    let map = obj.as_object_mut().expect("objects are JSON objects");
    match from.get("status") {
        Some(status) => map.insert("status".into(), status.clone()),
        None => map.remove("status"),
    };
    obj
}

/// 409 unless `rv` is absent/empty or equals the stored object's resourceVersion.
fn check_resource_version(stored: &Value, rv: Option<&str>) -> Result<(), Value> {
    match rv.filter(|rv| !rv.is_empty()) {
        Some(rv) if stored["metadata"]["resourceVersion"].as_str() != Some(rv) => Err(status(
            409,
            "Conflict",
            "Operation cannot be fulfilled: the object has been modified; please apply your changes to the latest version and try again",
        )),
        _ => Ok(()),
    }
}

/// The map at `obj[field]`, created (and `obj` made an object) if needed.
fn object_at<'a>(obj: &'a mut Value, field: &str) -> &'a mut Map<String, Value> {
    if !obj.is_object() {
        *obj = json!({});
    }
    let slot = obj
        .as_object_mut()
        .unwrap()
        .entry(field)
        .or_insert_with(|| json!({}));
    if !slot.is_object() {
        *slot = json!({});
    }
    slot.as_object_mut().unwrap()
}

/// Sets `apiVersion` and `kind` from the collection where missing (the server always returns them).
fn fill_type_meta(collection: &str, obj: &mut Value) {
    let plural = collection.rsplit('/').next().unwrap_or_default();
    if let Some(map) = obj.as_object_mut() {
        map.entry("apiVersion")
            .or_insert_with(|| api_version(collection).into());
        map.entry("kind").or_insert_with(|| kind_of(plural).into());
    }
}

/// `api/v1/pods` → `v1`, `apis/batch/v1/jobs` → `batch/v1`.
fn api_version(collection: &str) -> String {
    let without_plural = collection.rsplit_once('/').map_or("", |(head, _)| head);
    let version = without_plural
        .strip_prefix("apis/")
        .or_else(|| without_plural.strip_prefix("api/"));
    version.unwrap_or(without_plural).to_owned()
}

fn kind_of(plural: &str) -> String {
    let known = match plural {
        "configmaps" => "ConfigMap",
        "cronjobs" => "CronJob",
        "epicexports" => "EpicExport",
        "persistentvolumeclaims" => "PersistentVolumeClaim",
        "serviceaccounts" => "ServiceAccount",
        "statefulsets" => "StatefulSet",
        _ => "",
    };
    if !known.is_empty() {
        return known.to_owned();
    }
    // pods → Pod, leases → Lease, ...
    let singular = plural.strip_suffix('s').unwrap_or(plural);
    let mut chars = singular.chars();
    chars
        .next()
        .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
        .unwrap_or_default()
}

/// Kinds whose main endpoint ignores `.status` (it is written through `/status`).
fn has_status_subresource(plural: &str) -> bool {
    matches!(
        plural,
        "pods"
            | "jobs"
            | "cronjobs"
            | "deployments"
            | "statefulsets"
            | "epicexports"
            | "services"
            | "persistentvolumeclaims"
            | "namespaces"
            | "nodes"
    )
}

fn parse(body: &[u8]) -> Result<Value, Value> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| status(400, "BadRequest", &format!("invalid JSON body: {e}")))?;
    Ok(value)
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn respond(reply: Reply) -> http::Response<RespBody> {
    let (code, body) =
        reply.unwrap_or_else(|status| (status["code"].as_u64().unwrap_or(500) as u16, status));
    http::Response::builder()
        .status(code)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(RespBody::from(body.to_string()))
        .unwrap()
}

fn event_line(kind: &str, obj: &Value) -> String {
    format!("{}\n", json!({"type": kind, "object": obj}))
}

fn version_info() -> Value {
    json!({"major": "1", "minor": "35", "gitVersion": "v1.35.0-fake", "gitCommit": "", "gitTreeState": "clean",
           "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.24", "compiler": "gc", "platform": "linux/amd64"})
}

/// Now as RFC 3339 with second precision, e.g. `2025-06-01T02:00:00Z`.
fn now() -> String {
    let now = jiff::Timestamp::now();
    jiff::Timestamp::from_second(now.as_second())
        .unwrap_or(now)
        .to_string()
}

/// Five characters from the alphabet Kubernetes uses for generated names.
fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let bytes = uuid::Uuid::new_v4().into_bytes();
    bytes[..5]
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}
