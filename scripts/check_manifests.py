#!/usr/bin/env python3
"""Offline checks of the Helm chart and the example manifests (run by scripts/check-manifests.sh).

- The chart: `helm lint --strict` (Helm's SDK through helm-python-sdk, no helm binary) with its defaults
  and each ci/*-values.yaml; rendered with each of them, every object validated strictly (unknown fields
  are errors) against the Kubernetes schemas of the oldest supported and the newest known version
  (kubernetes-validate); what each value set must produce (RBAC scope, leader election, strategy, PDB,
  ServiceMonitor, NetworkPolicy, security settings, probes, env); its RBAC rules are exactly those of
  examples/operator.yaml; its CRD is byte-identical to crds/epicexport.yaml; bad values are refused.
- The examples: every document parses; built-in kinds validate strictly the same way; every EpicExport
  validates against the CRD's openAPIV3Schema (unknown fields refused, as `kubectl apply` does) and
  its x-kubernetes-validations CEL rules (cel-python); the sandbox kustomization lists every file and
  its references resolve; Argo CD and Flux objects are well-formed; the Argo CD health check (Lua)
  gives the expected health for each kind of status.
- Negative checks: broken inputs must fail, so that a checker that stopped checking is noticed.

Exits 1 listing every problem, 0 when all pass.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

import celpy
import helm_python as helm
import jsonschema
import kubernetes_validate
import lupa.lua51 as lua51
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "epic-export-operator"
CRD_FILE = ROOT / "crds" / "epicexport.yaml"
EXAMPLES = ROOT / "examples"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest kubernetes-validate knows.
KUBE_VERSIONS = ("1.30", kubernetes_validate.utils.major_minor(kubernetes_validate.utils.latest_version()))
RELEASE, RELEASE_NAMESPACE = "epic-export-operator", "epic-export-system"
UID = 65532

# Custom resources without a published schema here: checked for shape only.
FOREIGN_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("argoproj.io/v1alpha1", "Application"),
    ("source.toolkit.fluxcd.io/v1", "GitRepository"),
    ("kustomize.toolkit.fluxcd.io/v1", "Kustomization"),
}
EPICEXPORT = ("fhirexport.dev/v1alpha1", "EpicExport")
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}

problems: list[str] = []
checks = 0


def check(ok: bool, message: str) -> bool:
    global checks
    checks += 1
    if not ok:
        problems.append(message)
    return ok


def docs_of(text: str, where: str) -> list[dict]:
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        check(False, f"{where}: not YAML: {e}")
        return []
    for d in docs:
        check(isinstance(d, dict), f"{where}: a document is not a mapping")
    return [d for d in docs if isinstance(d, dict)]


def name_of(doc: dict) -> str:
    return f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"


# ---------------------------------------------------------------------------------------------------
# Validation of one object


def validate_builtin(doc: dict, where: str) -> None:
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
            check(True, "")
        except ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            check(False, f"{where}: {name_of(doc)} is invalid for Kubernetes {version}: {path}: {e.message}")
        except SchemaNotFoundError as e:
            check(False, f"{where}: {name_of(doc)}: {e.message}")


def validate_shape(doc: dict, where: str) -> None:
    meta = doc.get("metadata")
    check(
        isinstance(doc.get("apiVersion"), str)
        and isinstance(doc.get("kind"), str)
        and isinstance(meta, dict)
        and isinstance(meta.get("name"), str)
        and bool(meta["name"]),
        f"{where}: a document lacks apiVersion, kind or metadata.name",
    )
    check(isinstance(doc.get("spec"), dict), f"{where}: {name_of(doc)} has no spec")


class CrdValidator:
    """An EpicExport against the CRD: the structural schema (strict, as `kubectl apply` validates fields)
    and the CEL rules."""

    def __init__(self, crd: dict):
        version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
        self.api_version = f"{crd['spec']['group']}/{version['name']}"
        self.kind = crd["spec"]["names"]["kind"]
        self.openapi = version["schema"]["openAPIV3Schema"]
        root = copy.deepcopy(self.openapi)
        root.setdefault("properties", {}).update(
            {
                "apiVersion": {"type": "string", "enum": [self.api_version]},
                "kind": {"type": "string", "enum": [self.kind]},
                "metadata": {"type": "object"},
            }
        )
        root["required"] = sorted(set(root.get("required", [])) | {"apiVersion", "kind", "metadata"})
        self.schema = self._strict(root)
        self.validator = jsonschema.Draft7Validator(self.schema)
        self.cel = celpy.Environment()
        self.programs: dict[str, Any] = {}

    @classmethod
    def _strict(cls, node: Any) -> Any:
        """OpenAPI v3 structural schema -> JSON Schema: nullable, int-or-string, and no unknown fields."""
        if isinstance(node, list):
            return [cls._strict(n) for n in node]
        if not isinstance(node, dict):
            return node
        out = {k: cls._strict(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
        if node.get("x-kubernetes-int-or-string"):
            out.pop("type", None)
            out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if node.get("nullable") and "type" in out:
            out["type"] = [out["type"], "null"]
        if "properties" in node and "additionalProperties" not in node and not node.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
        if "properties" in out:
            out["properties"] = {k: cls._strict(v) for k, v in node["properties"].items()}
        if "additionalProperties" in node and isinstance(node["additionalProperties"], dict):
            out["additionalProperties"] = cls._strict(node["additionalProperties"])
        return out

    def errors(self, doc: dict) -> list[str]:
        found = [
            f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
            for e in sorted(self.validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        ]
        if not found:  # CEL rules assume a structurally valid object, like the API server
            self._cel(self.openapi, doc, "", found)
        return found

    def _cel(self, node: dict, value: Any, path: str, found: list[str]) -> None:
        if value is None:
            return
        for rule in node.get("x-kubernetes-validations", []):
            program = self.programs.get(rule["rule"])
            if program is None:
                try:
                    program = self.cel.program(self.cel.compile(rule["rule"]))
                except Exception as e:  # a rule the API server could not compile either
                    found.append(f"{path or '(root)'}: CEL rule {rule['rule']!r} does not compile: {e}")
                    continue
                self.programs[rule["rule"]] = program
            result = program.evaluate({"self": celpy.json_to_cel(value)})
            if not (isinstance(result, celpy.celtypes.BoolType) and bool(result)):
                found.append(f"{path or '(root)'}: {rule.get('message', rule['rule'])} (CEL: {rule['rule']})")
        if isinstance(value, dict):
            for key, sub in (node.get("properties") or {}).items():
                if key in value:
                    self._cel(sub, value[key], f"{path}.{key}" if path else key, found)
        if isinstance(value, list) and isinstance(node.get("items"), dict):
            for i, item in enumerate(value):
                self._cel(node["items"], item, f"{path}[{i}]", found)


def validate_object(doc: dict, where: str, crd: CrdValidator) -> None:
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key == EPICEXPORT:
        for error in crd.errors(doc):
            check(False, f"{where}: {name_of(doc)}: {error}")
        check(True, "")
    elif key in FOREIGN_KINDS:
        validate_shape(doc, where)
    else:
        validate_builtin(doc, where)


# ---------------------------------------------------------------------------------------------------
# RBAC


def triples(rules: Iterable[dict]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule.get("verbs", [])
    }


def is_lease_role(doc: dict) -> bool:
    return any("leases" in r.get("resources", []) for r in doc.get("rules", []))


def example_rbac() -> tuple[set, set]:
    docs = docs_of((EXAMPLES / "operator.yaml").read_text(), "examples/operator.yaml")
    roles = [d for d in docs if d.get("kind") in ("ClusterRole", "Role")]
    main = triples(r for d in roles if not is_lease_role(d) for r in d["rules"])
    leases = triples(r for d in roles if is_lease_role(d) for r in d["rules"])
    check(bool(main) and bool(leases), "examples/operator.yaml: no controller or lease rules found")
    return main, leases


# ---------------------------------------------------------------------------------------------------
# The chart


def find(docs: list[dict], kind: str, pred: Callable[[dict], bool] = lambda d: True) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind and pred(d)]


def labels_match(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_chart_objects(where: str, values: dict, docs: list[dict], rbac: tuple[set, set]) -> None:
    merged_replicas = values.get("replicaCount", 1)
    watch = values.get("watchNamespace", "")
    image_values = values.get("image", {})
    repository = image_values.get("repository", "epic-export")
    if image_values.get("digest"):
        image = f"{repository}@{image_values['digest']}"
    else:
        image = f"{repository}:{image_values.get('tag') or chart_app_version()}"

    for d in docs:
        meta = d.get("metadata", {})
        labels = meta.get("labels", {})
        check(
            labels.get("app.kubernetes.io/instance") == RELEASE
            and labels.get("app.kubernetes.io/managed-by") == "Helm"
            and "helm.sh/chart" in labels
            and "app.kubernetes.io/name" in labels,
            f"{where}: {name_of(d)} lacks the standard labels",
        )
        if d.get("kind") not in CLUSTER_SCOPED:
            check(bool(meta.get("namespace")), f"{where}: {name_of(d)} has no explicit namespace")

    deployments = find(docs, "Deployment")
    if not check(len(deployments) == 1, f"{where}: expected one Deployment, got {len(deployments)}"):
        return
    dep = deployments[0]
    pod = dep["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    check(labels_match(dep["spec"]["selector"]["matchLabels"], pod_labels), f"{where}: the Deployment selects no pod")
    check(dep["spec"]["replicas"] == merged_replicas, f"{where}: replicas is not {merged_replicas}")
    strategy = dep["spec"].get("strategy", {}).get("type")
    check(
        (strategy == "Recreate") == (merged_replicas == 1),
        f"{where}: strategy {strategy!r} with {merged_replicas} replica(s): Recreate exactly with one",
    )
    spec = pod["spec"]
    psc = spec.get("securityContext", {})
    check(
        psc.get("runAsNonRoot") is True
        and psc.get("runAsUser") == UID
        and psc.get("seccompProfile", {}).get("type") == "RuntimeDefault",
        f"{where}: the pod is not non-root {UID} with the RuntimeDefault seccomp profile",
    )
    sa_names = [d["metadata"]["name"] for d in find(docs, "ServiceAccount")]
    check(spec.get("serviceAccountName") in sa_names, f"{where}: the pod's ServiceAccount is not in the chart")
    containers = spec["containers"]
    check(len(containers) == 1, f"{where}: expected one container")
    c = containers[0]
    check(c["image"] == image, f"{where}: image {c['image']!r}, expected {image!r}")
    check(c.get("args") == ["controller", "--log-format", "json"], f"{where}: args {c.get('args')}")
    csc = c.get("securityContext", {})
    check(
        csc.get("allowPrivilegeEscalation") is False
        and csc.get("readOnlyRootFilesystem") is True
        and csc.get("capabilities", {}).get("drop") == ["ALL"],
        f"{where}: the container may escalate, write its root file system or keep capabilities",
    )
    resources = c.get("resources", {})
    check(
        bool(resources.get("requests")) and "memory" in resources.get("limits", {}),
        f"{where}: the container has no requests or memory limit",
    )
    env = {e["name"]: e for e in c.get("env", [])}
    check(
        env.get("EPIC_EXPORT_IMAGE", {}).get("value") == (values.get("jobImage") or image),
        f"{where}: EPIC_EXPORT_IMAGE is {env.get('EPIC_EXPORT_IMAGE')}",
    )
    leader = "true" if merged_replicas > 1 else "false"
    check(env.get("LEADER_ELECT", {}).get("value") == leader, f"{where}: LEADER_ELECT is not {leader!r}")
    check(
        env.get("WATCH_NAMESPACE", {}).get("value") == (watch or None),
        f"{where}: WATCH_NAMESPACE is {env.get('WATCH_NAMESPACE')}, expected {watch or 'none'}",
    )
    for var, field in (("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")):
        check(
            env.get(var, {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == field,
            f"{where}: {var} does not come from {field}",
        )
    port = values.get("metrics", {}).get("port", 8080)
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    check(ports.get("metrics") == port, f"{where}: the metrics port is not {port}")
    check(env.get("METRICS_ADDR", {}).get("value") == f"0.0.0.0:{port}", f"{where}: METRICS_ADDR")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = c.get(probe, {}).get("httpGet", {})
        check(
            get.get("path") == path and get.get("port") in ("metrics", port),
            f"{where}: {probe} is not GET {path} on the metrics port",
        )

    # RBAC: the controller's rules, cluster-wide or in the watched namespace; the lease rules with
    # leader election only; nothing else.
    main_rules, lease_rules = rbac
    roles = find(docs, "ClusterRole") + find(docs, "Role")
    main_roles = [r for r in roles if not is_lease_role(r)]
    lease_roles = [r for r in roles if is_lease_role(r)]
    check(len(main_roles) == 1, f"{where}: expected one role with the controller's rules, got {len(main_roles)}")
    for r in main_roles:
        if watch:
            check(
                r["kind"] == "Role" and r["metadata"]["namespace"] == watch,
                f"{where}: watchNamespace {watch}: the rules must be a Role there, not {name_of(r)}",
            )
        else:
            check(r["kind"] == "ClusterRole", f"{where}: watching all namespaces needs a ClusterRole")
        got = triples(r["rules"])
        check(
            got == main_rules,
            f"{where}: {name_of(r)} differs from examples/operator.yaml: extra {sorted(got - main_rules)},"
            f" missing {sorted(main_rules - got)}",
        )
    check(
        len(lease_roles) == (1 if merged_replicas > 1 else 0),
        f"{where}: {len(lease_roles)} lease Role(s) with {merged_replicas} replica(s)",
    )
    for r in lease_roles:
        check(
            r["kind"] == "Role" and r["metadata"]["namespace"] == RELEASE_NAMESPACE,
            f"{where}: the lease rules must be a Role in the release namespace",
        )
        check(triples(r["rules"]) == lease_rules, f"{where}: the lease rules differ from examples/operator.yaml")
    bindings = find(docs, "ClusterRoleBinding") + find(docs, "RoleBinding")
    check(len(bindings) == len(roles), f"{where}: {len(roles)} roles but {len(bindings)} bindings")
    role_keys = {(r["kind"], r["metadata"]["name"], r["metadata"].get("namespace")) for r in roles}
    for b in bindings:
        ref = b["roleRef"]
        ns = b["metadata"].get("namespace") if ref["kind"] == "Role" else None
        check((ref["kind"], ref["name"], ns) in role_keys, f"{where}: {name_of(b)} binds a role not in the chart")
        check(
            b["subjects"] == [{"kind": "ServiceAccount", "name": spec["serviceAccountName"], "namespace": RELEASE_NAMESPACE}],
            f"{where}: {name_of(b)} does not bind exactly the operator's ServiceAccount",
        )

    services = find(docs, "Service")
    check(len(services) == 1, f"{where}: expected one Service")
    for s in services:
        check(labels_match(s["spec"]["selector"], pod_labels), f"{where}: the metrics Service selects no pod")
        check(
            [p.get("targetPort") for p in s["spec"]["ports"]] == ["metrics"],
            f"{where}: the Service does not target the metrics port",
        )

    pdbs = find(docs, "PodDisruptionBudget")
    check(len(pdbs) == (1 if merged_replicas > 1 else 0), f"{where}: {len(pdbs)} PDB(s) with {merged_replicas} replica(s)")
    for p in pdbs:
        check(labels_match(p["spec"]["selector"]["matchLabels"], pod_labels), f"{where}: the PDB selects no pod")

    monitors = find(docs, "ServiceMonitor")
    want = values.get("metrics", {}).get("serviceMonitor", {}).get("enabled", False)
    check(len(monitors) == (1 if want else 0), f"{where}: {len(monitors)} ServiceMonitor(s), enabled={want}")
    for m in monitors:
        check(
            all(labels_match(m["spec"]["selector"]["matchLabels"], s["metadata"]["labels"]) for s in services),
            f"{where}: the ServiceMonitor does not select the metrics Service",
        )
        svc_ports = {p["name"] for s in services for p in s["spec"]["ports"]}
        check(
            all(e["port"] in svc_ports for e in m["spec"]["endpoints"]),
            f"{where}: the ServiceMonitor scrapes a port the Service lacks",
        )

    policies = find(docs, "NetworkPolicy")
    want = values.get("networkPolicy", {}).get("enabled", False)
    check(len(policies) == (1 if want else 0), f"{where}: {len(policies)} NetworkPolicy(ies), enabled={want}")
    for p in policies:
        check(labels_match(p["spec"]["podSelector"]["matchLabels"], pod_labels), f"{where}: the NetworkPolicy selects no pod")
        check(sorted(p["spec"]["policyTypes"]) == ["Egress", "Ingress"], f"{where}: the NetworkPolicy must restrict both ways")
        ingress_ports = [port for rule in p["spec"]["ingress"] for port in rule.get("ports", [])]
        check(
            ingress_ports == [{"port": "metrics", "protocol": "TCP"}],
            f"{where}: the NetworkPolicy lets in more than the metrics port: {ingress_ports}",
        )
        egress_ports = {(port["port"], port["protocol"]) for rule in p["spec"]["egress"] for port in rule["ports"]}
        api_ports = values.get("networkPolicy", {}).get("apiServer", {}).get("ports", [443, 6443])
        check(
            egress_ports == {(53, "UDP"), (53, "TCP")} | {(x, "TCP") for x in api_ports},
            f"{where}: the NetworkPolicy's egress is not DNS and the API server: {sorted(egress_ports, key=str)}",
        )


_app_version: str | None = None


def chart_app_version() -> str:
    global _app_version
    if _app_version is None:
        _app_version = str(yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"])
    return _app_version


def lint(values: dict | None, where: str) -> None:
    for version in KUBE_VERSIONS:
        report = helm.lint(str(CHART), values, strict=True, kube_version=f"v{version}.0")
        bad = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
        check(
            not report.get("errors") and not bad,
            f"{where}: helm lint --strict (Kubernetes {version}): {report.get('errors')} {bad}",
        )


def render(values: dict) -> dict[str, str]:
    with helm.Chart.load(str(CHART)) as chart:
        return chart.render(values, name=RELEASE, namespace=RELEASE_NAMESPACE, is_install=True)


def check_chart(crd: CrdValidator, rbac: tuple[set, set]) -> None:
    chart_crd = CHART / "crds" / "epicexport.yaml"
    check(
        chart_crd.read_bytes() == CRD_FILE.read_bytes(),
        f"{chart_crd.relative_to(ROOT)} differs from crds/epicexport.yaml: cp crds/epicexport.yaml {chart_crd.relative_to(ROOT)}",
    )
    for doc in docs_of(chart_crd.read_text(), "chart CRD"):
        validate_builtin(doc, "chart crds/epicexport.yaml")
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    cargo_version = next(
        line.split('"')[1] for line in (ROOT / "Cargo.toml").read_text().splitlines() if line.startswith("version")
    )
    check(meta.get("appVersion") == cargo_version, f"Chart.yaml appVersion {meta.get('appVersion')} != Cargo.toml {cargo_version}")

    lint(None, "chart defaults")
    value_files = sorted((CHART / "ci").glob("*-values.yaml"))
    check(len(value_files) >= 3, "charts/epic-export-operator/ci: expected at least three value sets")
    for path in value_files:
        where = f"chart with {path.relative_to(CHART)}"
        values = yaml.safe_load(path.read_text()) or {}
        lint(values, where)
        try:
            rendered = render(values)
        except helm.HelmError as e:
            check(False, f"{where}: render failed: {e}")
            continue
        docs: list[dict] = []
        for template, text in sorted(rendered.items()):
            if template.endswith("NOTES.txt"):
                check("kubectl" in text, f"{where}: NOTES.txt says nothing useful")
                continue
            docs += docs_of(text, f"{where}: {template}")
        for doc in docs:
            validate_object(doc, where, crd)
        check_chart_objects(where, values, docs, rbac)

    # Values the schema or the templates must refuse.
    for bad in (
        {"watchNamespaces": ["phi"]},
        {"watchNamespace": "phi,other"},
        {"replicaCount": 0},
        {"image": {"repository": "x", "tg": "1"}},
        {"serviceAccount": {"create": False}},
        {"networkPolicy": {"enabled": True, "apiServer": {"ports": []}}},
    ):
        try:
            render(bad)
            check(False, f"chart: values {bad} were accepted")
        except helm.HelmError:
            check(True, "")


# ---------------------------------------------------------------------------------------------------
# The examples


def check_negative_exports(crd: CrdValidator, export: dict) -> None:
    """Broken EpicExports must fail: proof that the schema and CEL checks still check."""

    def broken(change: Callable[[dict], None], expect: str) -> None:
        doc = copy.deepcopy(export)
        change(doc)
        errors = crd.errors(doc)
        check(
            any(expect in e for e in errors),
            f"negative check: an EpicExport that should fail with {expect!r} gave {errors or 'no error'}",
        )

    def both_sources(d: dict) -> None:
        d["spec"]["source"] = {
            "search": {"rosterRef": {"configMapName": "r", "key": "roster.csv"}, "resources": [{"type": "Patient"}]},
            "bulk": {"group": "g"},
        }

    broken(both_sources, "set exactly one of source.search and source.bulk")
    broken(lambda d: d["spec"]["source"].clear(), "set exactly one of source.search and source.bulk")
    broken(lambda d: d["metadata"].update(name="x" * 53), "at most 52 characters")
    broken(lambda d: d["spec"].update(schedule="TZ=UTC 0 1 * * *"), "timeZone")
    broken(lambda d: d["spec"]["fhir"].update(baseUrl="ftp://x"), "http(s) URL")
    broken(lambda d: d["spec"]["auth"].update(clientId=""), "clientId must not be empty")
    broken(lambda d: d["spec"].update(schedul="@daily"), "'schedul' was unexpected")
    broken(lambda d: d["spec"]["output"].update(keepRuns=0), "less than the minimum")
    broken(lambda d: d["spec"].pop("auth"), "'auth' is a required property")


def check_kustomization(path: Path) -> list[dict]:
    """A kustomization of plain resources: every file listed, namespaces consistent; returns its objects
    as kustomize would emit them (namespace set)."""
    where = str(path.relative_to(ROOT))
    k = yaml.safe_load(path.read_text())
    check(
        k.get("apiVersion") == "kustomize.config.k8s.io/v1beta1" and k.get("kind") == "Kustomization",
        f"{where}: not a kustomize.config.k8s.io/v1beta1 Kustomization",
    )
    allowed = {"apiVersion", "kind", "namespace", "resources", "images", "labels", "commonAnnotations"}
    check(set(k) <= allowed, f"{where}: unexpected fields {sorted(set(k) - allowed)}")
    namespace = k.get("namespace")
    listed = k.get("resources", [])
    files = sorted(p.name for p in path.parent.glob("*.yaml") if p.name != "kustomization.yaml")
    check(sorted(listed) == files, f"{where}: resources {sorted(listed)} are not exactly the folder's files {files}")
    objects: list[dict] = []
    for name in listed:
        file = path.parent / name
        if not check(file.is_file(), f"{where}: resource {name} does not exist"):
            continue
        for doc in docs_of(file.read_text(), f"{where}: {name}"):
            ns = doc.get("metadata", {}).get("namespace")
            check(ns in (None, namespace), f"{where}: {name}: {name_of(doc)} is in namespace {ns}, not {namespace}")
            doc = copy.deepcopy(doc)
            if doc.get("kind") not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = namespace
            objects.append(doc)
    check(
        any(d.get("kind") == "Namespace" and d["metadata"]["name"] == namespace for d in objects),
        f"{where}: no Namespace {namespace}",
    )
    images = [
        c["image"]
        for d in objects
        for c in (d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []))
    ]
    for image in k.get("images", []):
        check(
            any(i == image["name"] or i.startswith(image["name"] + ":") for i in images),
            f"{where}: images: {image['name']} is used by no container",
        )
    return objects


def check_references(objects: list[dict], where: str) -> None:
    """Within a self-contained set (the sandbox): what each EpicExport and pod refers to exists."""

    def get(kind: str, ns: str, name: str) -> dict | None:
        return next(
            (o for o in objects if o.get("kind") == kind and o["metadata"]["name"] == name and o["metadata"].get("namespace") == ns),
            None,
        )

    def has_key(obj: dict | None, key: str) -> bool:
        return obj is not None and key in {**obj.get("data", {}), **obj.get("stringData", {})}

    for e in (o for o in objects if (o.get("apiVersion"), o.get("kind")) == EPICEXPORT):
        ns, spec = e["metadata"]["namespace"], e["spec"]
        ref = spec["auth"]["keySecretRef"]
        check(has_key(get("Secret", ns, ref["name"]), ref["key"]), f"{where}: {name_of(e)}: no Secret {ref['name']} with key {ref['key']}")
        search = spec["source"].get("search", {})
        for r in [search.get("rosterRef"), search.get("resourcesRef")]:
            if r:
                check(
                    has_key(get("ConfigMap", ns, r["configMapName"]), r["key"]),
                    f"{where}: {name_of(e)}: no ConfigMap {r['configMapName']} with key {r['key']}",
                )
        claim = spec["output"]["volumeClaimName"]
        check(get("PersistentVolumeClaim", ns, claim) is not None, f"{where}: {name_of(e)}: no PVC {claim}")
        # The FHIR base URL names a Service of the set: http://<service>.<namespace>.svc:<port>/...
        host_port = spec["fhir"]["baseUrl"].split("/")[2]
        host, _, port = host_port.partition(":")
        parts = host.split(".")
        svc = get("Service", parts[1], parts[0]) if len(parts) >= 3 and parts[2] == "svc" else None
        if check(svc is not None, f"{where}: {name_of(e)}: baseUrl host {host} is no Service of this set"):
            check(
                any(str(p["port"]) == (port or "80") for p in svc["spec"]["ports"]),
                f"{where}: Service {parts[0]} has no port {port}",
            )
            pods = [o for o in objects if o.get("kind") == "Deployment" and labels_match(svc["spec"]["selector"], o["spec"]["template"]["metadata"]["labels"])]
            check(len(pods) == 1, f"{where}: Service {parts[0]} selects {len(pods)} Deployments")
    for d in (o for o in objects if o.get("kind") == "Deployment"):
        ns, pod = d["metadata"]["namespace"], d["spec"]["template"]["spec"]
        for v in pod.get("volumes", []):
            if "configMap" in v:
                check(get("ConfigMap", ns, v["configMap"]["name"]) is not None, f"{where}: {name_of(d)}: no ConfigMap {v['configMap']['name']}")
            if "secret" in v:
                check(get("Secret", ns, v["secret"]["secretName"]) is not None, f"{where}: {name_of(d)}: no Secret {v['secret']['secretName']}")


def check_argocd_health(path: Path) -> None:
    """The Argo CD health check (Lua 5.1, as Argo CD's gopher-lua) against each kind of status."""
    where = str(path.relative_to(ROOT))
    patch = yaml.safe_load(path.read_text())
    key = "resource.customizations.health.fhirexport.dev_EpicExport"
    if not check(isinstance(patch, dict) and set(patch) == {"data"} and key in patch["data"], f"{where}: not a merge patch of data.{key}"):
        return
    runtime = lua51.LuaRuntime(unpack_returned_tuples=True)
    health = runtime.eval(f"function(obj)\n{patch['data'][key]}\nend")

    def cond(type_: str, status: str, reason: str = "R", message: str = "m") -> dict:
        return {"type": type_, "status": status, "reason": reason, "message": message}

    cases = [
        ("no status yet", None, "Progressing"),
        ("not observed yet", {"observedGeneration": 1, "conditions": [cond("Ready", "True")]}, "Progressing"),
        ("ready", {"observedGeneration": 2, "conditions": [cond("Ready", "True"), cond("Stalled", "False")]}, "Healthy"),
        ("ready and running", {"observedGeneration": 2, "conditions": [cond("Ready", "True"), cond("Running", "True")]}, "Healthy"),
        ("stalled", {"observedGeneration": 2, "conditions": [cond("Ready", "False"), cond("Stalled", "True", "SecretNotFound", "no key")]}, "Degraded"),
        ("suspended", {"observedGeneration": 2, "conditions": [cond("Ready", "True", "Suspended")]}, "Suspended"),
    ]
    for label, status, expected in cases:
        obj: dict = {"metadata": {"name": "x", "generation": 2}, "spec": {}}
        if status is not None:
            obj["status"] = status
        try:
            result = health(runtime.table_from(obj, recursive=True))
            got = result["status"]
        except Exception as e:  # a Lua error is a broken health check
            got = f"error: {e}"
        check(got == expected, f"{where}: Argo CD health of an EpicExport ({label}) is {got}, expected {expected}")


def check_gitops(objects: list[tuple[str, dict]]) -> None:
    by_kind = {(d["apiVersion"], d["kind"]): (w, d) for w, d in objects}
    app = by_kind.get(("argoproj.io/v1alpha1", "Application"))
    if check(app is not None, "examples/gitops: no Argo CD Application"):
        where, d = app
        s = d["spec"]
        check(
            all(s.get("source", {}).get(k) for k in ("repoURL", "path", "targetRevision"))
            and s.get("destination", {}).get("namespace")
            and s.get("project"),
            f"{where}: the Application lacks source.repoURL/path/targetRevision, destination.namespace or project",
        )
    repo = by_kind.get(("source.toolkit.fluxcd.io/v1", "GitRepository"))
    kust = by_kind.get(("kustomize.toolkit.fluxcd.io/v1", "Kustomization"))
    if check(repo is not None and kust is not None, "examples/gitops: no Flux GitRepository and Kustomization"):
        where, k = kust
        ref = k["spec"].get("sourceRef", {})
        check(
            ref.get("kind") == "GitRepository"
            and ref.get("name") == repo[1]["metadata"]["name"]
            and k["metadata"]["namespace"] == repo[1]["metadata"]["namespace"],
            f"{where}: sourceRef does not name the GitRepository",
        )
        checks_ = k["spec"].get("healthChecks", [])
        check(
            k["spec"].get("wait") is True
            or any((h.get("apiVersion"), h.get("kind")) == EPICEXPORT and h.get("name") for h in checks_),
            f"{where}: neither wait: true nor a healthCheck of an EpicExport",
        )


def check_examples(crd: CrdValidator) -> None:
    files = sorted(EXAMPLES.rglob("*.yaml"))
    check(len(files) >= 8, f"examples: only {len(files)} YAML files found")
    exports: list[dict] = []
    gitops: list[tuple[str, dict]] = []
    for path in files:
        where = str(path.relative_to(ROOT))
        if path.name == "kustomization.yaml":
            objects = check_kustomization(path)
            check_references(objects, where)
            continue
        if path.name == "argocd-cm-patch.yaml":
            check_argocd_health(path)
            continue
        docs = docs_of(path.read_text(), where)
        check(bool(docs), f"{where}: no documents")
        for doc in docs:
            validate_object(doc, where, crd)
            if (doc.get("apiVersion"), doc.get("kind")) == EPICEXPORT:
                exports.append(doc)
            if path.parent.name == "gitops":
                gitops.append((where, doc))
    check(len(exports) >= 4, f"examples: only {len(exports)} EpicExports found")
    check_gitops(gitops)
    if exports:
        check_negative_exports(crd, exports[0])


def main() -> int:
    crd_docs = docs_of(CRD_FILE.read_text(), "crds/epicexport.yaml")
    if not check(len(crd_docs) == 1, "crds/epicexport.yaml: expected one CRD"):
        return report()
    crd = CrdValidator(crd_docs[0])
    rbac = example_rbac()
    check_chart(crd, rbac)
    check_examples(crd)
    return report()


def report() -> int:
    if problems:
        for p in problems:
            print(f"FAIL {p}")
        print(f"check-manifests: {len(problems)} of {checks} checks failed")
        return 1
    print(f"check-manifests: {checks} checks passed (Kubernetes {', '.join(KUBE_VERSIONS)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
