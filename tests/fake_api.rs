//! Self-test of the fake Kubernetes API server in `support/fake_api.rs`: kube's own `Api`, watcher,
//! event `Recorder` and lease handling run against it.

#[path = "support/fake_api.rs"]
mod fake_api;

use std::sync::Arc;
use std::time::Duration;

use fake_api::FakeApi;
use futures::{Stream, StreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Pod, Secret};
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::ResourceExt;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use serde_json::{Value, json};

const NS: &str = "phi";
const CONFIGMAPS: &str = "api/v1/configmaps";
const JOBS: &str = "apis/batch/v1/jobs";
const PODS: &str = "api/v1/pods";

fn configmap(name: &str, labels: Value, data: Value) -> ConfigMap {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "data": data,
    }))
    .unwrap()
}

fn job(name: &str) -> Job {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/name": "epic-export"}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "export", "image": "epic-export:test", "args": ["job"]}],
                },
            },
        },
        // The API server ignores status on create for kinds with a status subresource.
        "status": {"active": 5},
    }))
    .unwrap()
}

/// The HTTP status code of a kube API error.
fn code<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> u16 {
    match result {
        Err(kube::Error::Api(status)) => status.code,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn rv<K: kube::Resource>(obj: &K) -> String {
    obj.meta().resource_version.clone().unwrap()
}

async fn next_within<S: Stream + Unpin>(stream: &mut S, secs: u64) -> Option<S::Item> {
    tokio::time::timeout(Duration::from_secs(secs), stream.next())
        .await
        .ok()
        .flatten()
}

#[tokio::test]
async fn create_get_list_select_and_errors() {
    let fake = FakeApi::new();
    let cms: Api<ConfigMap> = Api::namespaced(fake.client(), NS);
    let pp = PostParams::default();

    let created = cms
        .create(
            &pp,
            &configmap("a", json!({"tier": "db", "team": "x"}), json!({"k": "1"})),
        )
        .await
        .unwrap();
    let meta = &created.metadata;
    assert_eq!(meta.namespace.as_deref(), Some(NS));
    assert_eq!(meta.generation, Some(1));
    assert!(meta.uid.as_ref().is_some_and(|u| u.len() >= 32));
    assert!(meta.creation_timestamp.is_some());
    cms.create(&pp, &configmap("b", json!({"tier": "web"}), json!({})))
        .await
        .unwrap();
    cms.create(&pp, &configmap("c", json!({}), json!({})))
        .await
        .unwrap();
    assert!(rv(&created).parse::<u64>().unwrap() > 0);

    let got = cms.get("a").await.unwrap();
    assert_eq!(got.data.unwrap()["k"], "1");
    assert_eq!(got.metadata.uid, created.metadata.uid);

    let names = |list: kube::core::ObjectList<ConfigMap>| -> Vec<String> {
        list.items
            .into_iter()
            .map(|c| c.metadata.name.unwrap())
            .collect()
    };
    let list = cms.list(&ListParams::default()).await.unwrap();
    assert_eq!(
        list.metadata.resource_version,
        Some(fake.resource_version().to_string())
    );
    assert_eq!(names(list), ["a", "b", "c"]);
    assert_eq!(
        names(
            cms.list(&ListParams::default().labels("tier=db"))
                .await
                .unwrap()
        ),
        ["a"]
    );
    assert_eq!(
        names(
            cms.list(&ListParams::default().labels("tier!=db"))
                .await
                .unwrap()
        ),
        ["b", "c"]
    );
    assert_eq!(
        names(
            cms.list(&ListParams::default().labels("tier"))
                .await
                .unwrap()
        ),
        ["a", "b"]
    );
    assert_eq!(
        names(
            cms.list(&ListParams::default().labels("tier,team=x"))
                .await
                .unwrap()
        ),
        ["a"]
    );
    assert_eq!(
        names(
            cms.list(&ListParams::default().labels("tier in (web,api)"))
                .await
                .unwrap()
        ),
        ["b"]
    );
    assert_eq!(
        names(
            cms.list(&ListParams::default().fields("metadata.name=c"))
                .await
                .unwrap()
        ),
        ["c"]
    );

    // Other namespaces are separate, and a cluster-wide list spans them.
    let other: Api<ConfigMap> = Api::namespaced(fake.client(), "other");
    other
        .create(&pp, &configmap("a", json!({}), json!({})))
        .await
        .unwrap();
    assert_eq!(
        names(cms.list(&ListParams::default()).await.unwrap()).len(),
        3
    );
    let all: Api<ConfigMap> = Api::all(fake.client());
    assert_eq!(
        all.list(&ListParams::default()).await.unwrap().items.len(),
        4
    );

    assert_eq!(code(cms.get("missing").await), 404);
    assert_eq!(
        code(cms.create(&pp, &configmap("a", json!({}), json!({}))).await),
        409
    );

    // generateName.
    let generated: ConfigMap =
        serde_json::from_value(json!({"metadata": {"generateName": "gen-"}})).unwrap();
    let generated = cms.create(&pp, &generated).await.unwrap();
    let name = generated.metadata.name.unwrap();
    assert!(name.starts_with("gen-") && name.len() == 9, "{name}");

    // Direct store access sees the same objects; the request log has every API call.
    assert_eq!(fake.get(CONFIGMAPS, NS, "a").unwrap()["data"]["k"], "1");
    assert_eq!(fake.list(CONFIGMAPS, None).len(), 5);
    let requests = fake.requests();
    assert_eq!(requests[0].method, "POST");
    assert_eq!(requests[0].path, "/api/v1/namespaces/phi/configmaps");
    assert_eq!(requests[0].verb(), "create");
    let get = requests.iter().find(|r| r.method == "GET").unwrap();
    assert_eq!(
        (get.path.as_str(), get.verb()),
        ("/api/v1/namespaces/phi/configmaps/a", "get")
    );
    assert_eq!(fake.writes_since(0).len(), 6);
    assert!(fake.writes_since(requests.len()).is_empty());
}

#[tokio::test]
async fn patches_status_and_generation() {
    let fake = FakeApi::new();
    let jobs: Api<Job> = Api::namespaced(fake.client(), NS);
    let created = jobs
        .create(&PostParams::default(), &job("nightly"))
        .await
        .unwrap();
    assert!(created.status.is_none(), "status is not writable on create");
    assert_eq!(created.metadata.generation, Some(1));

    // Merge patch of metadata only: no generation bump.
    let pp = PatchParams::default();
    let patched = jobs
        .patch(
            "nightly",
            &pp,
            &Patch::Merge(json!({"metadata": {"labels": {"a": "1"}}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.metadata.labels.as_ref().unwrap()["a"], "1");
    assert_eq!(patched.metadata.generation, Some(1));
    assert_ne!(rv(&patched), rv(&created));

    // Merge patch of the spec bumps it; `.status` in a main-endpoint patch is ignored.
    let patch = json!({"spec": {"backoffLimit": 2}, "status": {"failed": 3}});
    let patched = jobs
        .patch("nightly", &pp, &Patch::Merge(patch))
        .await
        .unwrap();
    assert_eq!(patched.spec.as_ref().unwrap().backoff_limit, Some(2));
    assert_eq!(patched.metadata.generation, Some(2));
    assert!(patched.status.is_none());

    // JSON patch, including the null `test` of a missing path that kube-runtime sends.
    let ops = json!([
        {"op": "test", "path": "/metadata/finalizers", "value": null},
        {"op": "replace", "path": "/spec/backoffLimit", "value": 4},
        {"op": "add", "path": "/metadata/labels/b", "value": "2"},
    ]);
    let patched = jobs
        .patch(
            "nightly",
            &pp,
            &Patch::Json::<()>(serde_json::from_value(ops).unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(patched.spec.as_ref().unwrap().backoff_limit, Some(4));
    assert_eq!(patched.metadata.labels.as_ref().unwrap()["b"], "2");
    assert_eq!(patched.metadata.generation, Some(3));
    let failing = json!([{"op": "test", "path": "/spec/backoffLimit", "value": 9}]);
    assert_eq!(
        code(
            jobs.patch(
                "nightly",
                &pp,
                &Patch::Json::<()>(serde_json::from_value(failing).unwrap())
            )
            .await
        ),
        422
    );

    // Server-side apply merges the given fields.
    let apply = json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "nightly", "annotations": {"x": "y"}}});
    let applied = jobs
        .patch(
            "nightly",
            &PatchParams::apply("test").force(),
            &Patch::Apply(apply),
        )
        .await
        .unwrap();
    assert_eq!(applied.metadata.annotations.as_ref().unwrap()["x"], "y");
    assert_eq!(applied.metadata.labels.as_ref().unwrap()["a"], "1");
    assert_eq!(applied.metadata.generation, Some(3));

    // patch_status changes only the status (and not the generation).
    let patch = json!({"spec": {"backoffLimit": 7}, "status": {"active": 1}});
    let patched = jobs
        .patch_status("nightly", &pp, &Patch::Merge(patch))
        .await
        .unwrap();
    assert_eq!(patched.status.as_ref().unwrap().active, Some(1));
    assert_eq!(patched.spec.as_ref().unwrap().backoff_limit, Some(4));
    assert_eq!(patched.metadata.generation, Some(3));
    assert_eq!(
        fake.get(JOBS, NS, "nightly").unwrap()["status"]["active"],
        1
    );

    // An apply to /status replaces the whole status.
    let apply = json!({"apiVersion": "batch/v1", "kind": "Job", "status": {"failed": 1}});
    let applied = jobs
        .patch_status(
            "nightly",
            &PatchParams::apply("test").force(),
            &Patch::Apply(apply),
        )
        .await
        .unwrap();
    let status = applied.status.unwrap();
    assert_eq!((status.failed, status.active), (Some(1), None));

    // Apply creates missing objects; other patches of missing objects are 404.
    let cms: Api<ConfigMap> = Api::namespaced(fake.client(), NS);
    let apply = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "applied"}, "data": {"k": "v"}});
    let created = cms
        .patch("applied", &PatchParams::apply("test"), &Patch::Apply(apply))
        .await
        .unwrap();
    assert_eq!(created.data.unwrap()["k"], "v");
    assert_eq!(created.metadata.namespace.as_deref(), Some(NS));
    assert_eq!(
        code(
            cms.patch("nope", &pp, &Patch::Merge(json!({"data": {}})))
                .await
        ),
        404
    );
}

#[tokio::test]
async fn no_op_writes_keep_the_resource_version_and_emit_no_event() {
    let fake = FakeApi::new();
    let cms: Api<ConfigMap> = Api::namespaced(fake.client(), NS);
    let created = cms
        .create(
            &PostParams::default(),
            &configmap("a", json!({"l": "1"}), json!({"k": "1"})),
        )
        .await
        .unwrap();
    let mut events = cms
        .watch(&WatchParams::default().timeout(30), &rv(&created))
        .await
        .unwrap()
        .boxed();

    let before = fake.resource_version();
    let pp = PatchParams::default();
    let same = cms
        .patch(
            "a",
            &pp,
            &Patch::Merge(json!({"metadata": {"labels": {"l": "1"}}})),
        )
        .await
        .unwrap();
    assert_eq!(rv(&same), rv(&created));
    let replaced = cms
        .replace("a", &PostParams::default(), &same)
        .await
        .unwrap();
    assert_eq!(rv(&replaced), rv(&created));
    let applied = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"k": "1"}});
    let applied = cms
        .patch("a", &PatchParams::apply("t"), &Patch::Apply(applied))
        .await
        .unwrap();
    assert_eq!(rv(&applied), rv(&created));
    assert_eq!(
        fake.put(CONFIGMAPS, fake.get(CONFIGMAPS, NS, "a").unwrap())["metadata"]["resourceVersion"],
        rv(&created)
    );
    assert_eq!(fake.resource_version(), before);

    // The first event the watch sees is the real change that came after the no-ops.
    cms.patch("a", &pp, &Patch::Merge(json!({"data": {"k": "2"}})))
        .await
        .unwrap();
    match next_within(&mut events, 5).await {
        Some(Ok(WatchEvent::Modified(cm))) => assert_eq!(cm.data.unwrap()["k"], "2"),
        other => panic!("expected the modification, got {other:?}"),
    }
    assert!(
        next_within(&mut events, 1).await.is_none(),
        "no further events"
    );
}

#[tokio::test]
async fn watcher_sees_creates_and_modifications() {
    let fake = FakeApi::new();
    let cms: Api<ConfigMap> = Api::namespaced(fake.client(), NS);
    let pp = PostParams::default();
    cms.create(&pp, &configmap("existing", json!({}), json!({})))
        .await
        .unwrap();
    let mut stream = watcher(cms.clone(), watcher::Config::default()).boxed();

    let mut initial = Vec::new();
    loop {
        match next_within(&mut stream, 5)
            .await
            .expect("watcher event")
            .unwrap()
        {
            watcher::Event::Init => {}
            watcher::Event::InitApply(cm) => initial.push(cm.metadata.name.unwrap()),
            watcher::Event::InitDone => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(initial, ["existing"]);

    cms.create(&pp, &configmap("new", json!({}), json!({"k": "1"})))
        .await
        .unwrap();
    match next_within(&mut stream, 5)
        .await
        .expect("watcher event")
        .unwrap()
    {
        watcher::Event::Apply(cm) => assert_eq!(cm.metadata.name.as_deref(), Some("new")),
        other => panic!("unexpected {other:?}"),
    }
    cms.patch(
        "existing",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "2"}})),
    )
    .await
    .unwrap();
    match next_within(&mut stream, 5)
        .await
        .expect("watcher event")
        .unwrap()
    {
        watcher::Event::Apply(cm) => assert_eq!(cm.data.unwrap()["k"], "2"),
        other => panic!("unexpected {other:?}"),
    }
    cms.delete("new", &DeleteParams::default()).await.unwrap();
    match next_within(&mut stream, 5)
        .await
        .expect("watcher event")
        .unwrap()
    {
        watcher::Event::Delete(cm) => assert_eq!(cm.metadata.name.as_deref(), Some("new")),
        other => panic!("unexpected {other:?}"),
    }

    // The watcher listed, then watched from the list's resourceVersion with bookmarks allowed.
    let requests = fake.requests();
    let list = requests.iter().find(|r| r.verb() == "list").unwrap();
    assert_eq!(list.path, "/api/v1/namespaces/phi/configmaps");
    let watch = requests.iter().find(|r| r.verb() == "watch").unwrap();
    assert_eq!(watch.param("allowWatchBookmarks").as_deref(), Some("true"));
    assert!(watch.param("resourceVersion").is_some_and(|rv| rv != "0"));
}

#[tokio::test]
async fn watches_replay_history_filter_and_end_after_their_timeout() {
    let fake = FakeApi::new();
    let cms: Api<ConfigMap> = Api::namespaced(fake.client(), NS);
    let pp = PostParams::default();
    let a = cms
        .create(&pp, &configmap("a", json!({"app": "x"}), json!({})))
        .await
        .unwrap();
    cms.create(&pp, &configmap("b", json!({"app": "y"}), json!({})))
        .await
        .unwrap();
    cms.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "1"}})),
    )
    .await
    .unwrap();

    // Changes after the given resourceVersion are replayed (nothing between LIST and WATCH is lost),
    // filtered by the label selector.
    let wp = WatchParams::default().labels("app=x").timeout(1);
    let events: Vec<_> = cms.watch(&wp, &rv(&a)).await.unwrap().collect().await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(
        matches!(&events[0], Ok(WatchEvent::Modified(cm)) if cm.data.as_ref().unwrap()["k"] == "1")
    );

    // From "0", the current objects come as ADDED.
    let events: Vec<_> = cms
        .watch(&WatchParams::default().timeout(1), "0")
        .await
        .unwrap()
        .collect()
        .await;
    assert_eq!(events.len(), 2);
    assert!(events.iter().all(|e| matches!(e, Ok(WatchEvent::Added(_)))));
}

#[tokio::test]
async fn finished_jobs_and_garbage_collection() {
    let fake = FakeApi::new();
    let jobs: Api<Job> = Api::namespaced(fake.client(), NS);
    let pods: Api<Pod> = Api::namespaced(fake.client(), NS);
    let pp = PostParams::default();
    let created = jobs.create(&pp, &job("ok")).await.unwrap();
    jobs.create(&pp, &job("bad")).await.unwrap();

    fake.start_job(NS, "ok");
    let started = jobs.get("ok").await.unwrap().status.unwrap();
    assert_eq!(started.active, Some(1));
    assert!(started.start_time.is_some());

    fake.finish_job(NS, "ok", true, "{\"report\":1}");
    let status = jobs.get("ok").await.unwrap().status.unwrap();
    assert_eq!((status.succeeded, status.active), (Some(1), None));
    assert!(status.completion_time.is_some());
    assert_eq!(status.start_time, started.start_time);
    let conditions: Vec<(String, String)> = status
        .conditions
        .unwrap()
        .into_iter()
        .map(|c| (c.type_, c.status))
        .collect();
    assert!(
        conditions.contains(&("Complete".into(), "True".into())),
        "{conditions:?}"
    );
    assert!(
        conditions.contains(&("SuccessCriteriaMet".into(), "True".into())),
        "{conditions:?}"
    );

    let job_pods = pods
        .list(&ListParams::default().labels("job-name=ok"))
        .await
        .unwrap()
        .items;
    assert_eq!(job_pods.len(), 1);
    let pod = &job_pods[0];
    assert!(pod.metadata.name.as_ref().unwrap().starts_with("ok-"));
    assert_eq!(
        pod.metadata.labels.as_ref().unwrap()["controller-uid"],
        *created.metadata.uid.as_ref().unwrap()
    );
    assert_eq!(
        pod.metadata.owner_references.as_ref().unwrap()[0].uid,
        *created.metadata.uid.as_ref().unwrap()
    );
    let pod_status = pod.status.as_ref().unwrap();
    assert_eq!(pod_status.phase.as_deref(), Some("Succeeded"));
    let terminated = pod_status.container_statuses.as_ref().unwrap()[0]
        .state
        .as_ref()
        .unwrap()
        .terminated
        .as_ref()
        .unwrap();
    assert_eq!(
        (terminated.exit_code, terminated.message.as_deref()),
        (0, Some("{\"report\":1}"))
    );

    fake.finish_job(NS, "bad", false, "boom");
    let status = jobs.get("bad").await.unwrap().status.unwrap();
    assert_eq!(
        (status.failed, status.succeeded, status.completion_time),
        (Some(1), None, None)
    );
    let types: Vec<String> = status
        .conditions
        .unwrap()
        .into_iter()
        .map(|c| c.type_)
        .collect();
    assert!(
        types.contains(&"Failed".into()) && types.contains(&"FailureTarget".into()),
        "{types:?}"
    );
    let bad_pod = &fake
        .list(PODS, Some(NS))
        .into_iter()
        .find(|p| p["metadata"]["labels"]["job-name"] == "bad")
        .unwrap();
    assert_eq!(
        bad_pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"],
        1
    );

    // Deleting a Job in the background takes its pods along; without a policy they are orphaned.
    jobs.delete("ok", &DeleteParams::background())
        .await
        .unwrap();
    assert!(fake.get(JOBS, NS, "ok").is_none());
    assert_eq!(fake.list(PODS, Some(NS)).len(), 1);
    jobs.delete("bad", &DeleteParams::default()).await.unwrap();
    assert_eq!(fake.list(PODS, Some(NS)).len(), 1, "orphaned");

    // Deleting an owner deletes what it owns, recursively, in any collection.
    let cms: Api<ConfigMap> = Api::namespaced(fake.client(), NS);
    let owner = cms
        .create(&pp, &configmap("owner", json!({}), json!({})))
        .await
        .unwrap();
    let owner_ref = json!([{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}]);
    let owned_job = fake.put(JOBS, json!({"metadata": {"name": "owned", "namespace": NS, "ownerReferences": owner_ref.clone()}}));
    fake.finish_job(NS, "owned", true, "");
    let secret = json!({"metadata": {"name": "s", "namespace": NS, "ownerReferences": owner_ref}});
    fake.put("api/v1/secrets", secret);
    assert_eq!(owned_job["metadata"]["generation"], 1);
    cms.delete("owner", &DeleteParams::default()).await.unwrap();
    assert!(fake.get(JOBS, NS, "owned").is_none());
    assert!(fake.get("api/v1/secrets", NS, "s").is_none());
    assert_eq!(
        fake.list(PODS, Some(NS)).len(),
        1,
        "only the orphan is left"
    );
    assert_eq!(
        code(cms.delete("owner", &DeleteParams::default()).await),
        404
    );
}

#[tokio::test]
async fn finalizers_delay_deletion() {
    let fake = FakeApi::new();
    let secrets: Api<Secret> = Api::namespaced(fake.client(), NS);
    let secret: Secret =
        serde_json::from_value(json!({"metadata": {"name": "s", "finalizers": ["x/y"]}})).unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    secrets.delete("s", &DeleteParams::default()).await.unwrap();
    let pending = secrets.get("s").await.unwrap();
    assert!(pending.metadata.deletion_timestamp.is_some());
    secrets
        .patch(
            "s",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
    assert_eq!(code(secrets.get("s").await), 404);
}

#[tokio::test]
async fn lease_replace_with_a_stale_resource_version_conflicts() {
    let fake = FakeApi::new();
    let leases: Api<Lease> = Api::namespaced(fake.client(), NS);
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "epic-export-leader"},
        "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15},
    }))
    .unwrap();
    let created = leases.create(&PostParams::default(), &lease).await.unwrap();

    let mut mine = created.clone();
    mine.spec.as_mut().unwrap().holder_identity = Some("b".into());
    let taken = leases
        .replace("epic-export-leader", &PostParams::default(), &mine)
        .await
        .unwrap();
    assert_eq!(
        taken.spec.as_ref().unwrap().holder_identity.as_deref(),
        Some("b")
    );
    assert_ne!(rv(&taken), rv(&created));

    let mut stale = created;
    stale.spec.as_mut().unwrap().holder_identity = Some("c".into());
    assert_eq!(
        code(
            leases
                .replace("epic-export-leader", &PostParams::default(), &stale)
                .await
        ),
        409
    );
    let current = leases.get("epic-export-leader").await.unwrap();
    assert_eq!(current.spec.unwrap().holder_identity.as_deref(), Some("b"));
    assert_eq!(
        code(
            leases
                .replace("absent", &PostParams::default(), &mine)
                .await
        ),
        404
    );
}

#[tokio::test]
async fn recorder_creates_then_patches_events() {
    let fake = FakeApi::new();
    let cms: Api<ConfigMap> = Api::namespaced(fake.client(), NS);
    let cm = cms
        .create(
            &PostParams::default(),
            &configmap("roster", json!({}), json!({})),
        )
        .await
        .unwrap();
    let reference = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("ConfigMap".into()),
        name: cm.metadata.name.clone(),
        namespace: cm.metadata.namespace.clone(),
        uid: cm.metadata.uid.clone(),
        ..Default::default()
    };
    let reporter = Reporter {
        controller: "epic-export".into(),
        instance: Some("pod-1".into()),
    };
    let recorder = Recorder::new(fake.client(), reporter);
    let event = Event {
        type_: EventType::Normal,
        reason: "Scheduled".into(),
        note: Some("next run at 02:00".into()),
        action: "Schedule".into(),
        secondary: None,
    };
    let mark = fake.requests().len();
    recorder.publish(&event, &reference).await.unwrap();
    recorder.publish(&event, &reference).await.unwrap();

    let writes: Vec<(String, String)> = fake
        .writes_since(mark)
        .into_iter()
        .map(|r| (r.method, r.path))
        .collect();
    assert_eq!(writes.len(), 2, "{writes:?}");
    assert_eq!(
        writes[0],
        (
            "POST".into(),
            "/apis/events.k8s.io/v1/namespaces/phi/events".into()
        )
    );
    assert_eq!(writes[1].0, "PATCH");

    let events: Api<K8sEvent> = Api::namespaced(fake.client(), NS);
    let stored = events.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(stored.len(), 1);
    let stored = &stored[0];
    assert_eq!(stored.reason.as_deref(), Some("Scheduled"));
    assert_eq!(
        stored.regarding.as_ref().unwrap().name.as_deref(),
        Some("roster")
    );
    assert_eq!(stored.series.as_ref().unwrap().count, 2);
}

/// Labels the ConfigMap; a write that changes nothing must not trigger another reconcile.
async fn label(cm: Arc<ConfigMap>, api: Arc<Api<ConfigMap>>) -> Result<Action, kube::Error> {
    let patch = Patch::Merge(json!({"metadata": {"labels": {"seen": "true"}}}));
    api.patch(&cm.name_any(), &PatchParams::default(), &patch)
        .await?;
    Ok(Action::await_change())
}

#[tokio::test]
async fn controller_reconciles_and_settles() {
    let fake = FakeApi::new();
    let cms: Api<ConfigMap> = Api::namespaced(fake.client(), NS);
    let pp = PostParams::default();
    cms.create(&pp, &configmap("before", json!({}), json!({})))
        .await
        .unwrap();
    let controller = Controller::new(cms.clone(), watcher::Config::default()).run(
        label,
        |_, _, _| Action::requeue(Duration::from_secs(1)),
        Arc::new(cms.clone()),
    );
    let controller = tokio::spawn(controller.for_each(|_| async {}));
    cms.create(&pp, &configmap("after", json!({}), json!({})))
        .await
        .unwrap();

    let labelled = |name: &str| {
        fake.get(CONFIGMAPS, NS, name)
            .is_some_and(|cm| cm["metadata"]["labels"]["seen"] == "true")
    };
    tokio::time::timeout(Duration::from_secs(10), async {
        while !(labelled("before") && labelled("after")) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("both ConfigMaps reconciled");

    // Each object is patched once for real and at most once more (a no-op, which emits no event),
    // then the controller is idle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let patches = || {
        fake.requests()
            .iter()
            .filter(|r| r.method == "PATCH")
            .count()
    };
    let settled = patches();
    assert!((2..=4).contains(&settled), "{settled} patches");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(patches(), settled, "the controller keeps writing");
    controller.abort();
}
