#!/usr/bin/env python3
"""Offline checks of the Helm chart and the example manifests (run by scripts/check-manifests.sh).

- The chart: `helm lint --strict` (Helm's SDK through helm-python-sdk, no helm binary) with its defaults
  and each ci/*-values.yaml; rendered with each of them, every object validated strictly (unknown fields
  are errors) against the Kubernetes schemas of the oldest supported and the newest known version
  (kubernetes-validate); what each value set must produce (RBAC scope, leader election, strategy, PDB,
  ServiceMonitor, the Grafana dashboard ConfigMap and the PrometheusRule (labels, the chart files they
  hold, each alert's annotations), NetworkPolicies, security settings, probes, env, the JWK Set server's own Deployment,
  ServiceAccount, RBAC, Service and Ingress, the aggregated roles, NOTES.txt); its RBAC rules are exactly
  those of examples/operator.yaml (plus, with keyRotation.enabled, the key rotation rule commented out
  there), the operator never lists or watches Secrets and the JWK Set server may only read EpicExports;
  its CRD is byte-identical to crds/epicexport.yaml; bad values are refused.
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
import json
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
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("argoproj.io/v1alpha1", "Application"),
    ("source.toolkit.fluxcd.io/v1", "GitRepository"),
    ("kustomize.toolkit.fluxcd.io/v1", "Kustomization"),
}
EPICEXPORT = ("fhirexport.dev/v1alpha1", "EpicExport")
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
# Granted only with the chart's keyRotation.enabled (commented out in examples/operator.yaml).
ROTATION_RULES = {("", "secrets", "update")}
# The chart's JWK Set endpoint defaults (values.yaml).
JWKS_DEFAULTS = {
    "enabled": True,
    "replicaCount": 1,
    "port": 8081,
    "healthPort": 8080,
    "maxAgeSeconds": 3600,
    "rotationMaxAgeSeconds": 300,
}

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
            self._cel(self.openapi, self._typed(self.openapi, doc), "", found)
        return found

    @classmethod
    def _typed(cls, node: Any, value: Any) -> Any:
        """`value` as the API server hands it to CEL: a JSON integer where the schema says `number`
        is a double (cel-python would compare an int with a double literal as a type error)."""
        if not isinstance(node, dict):
            return value
        if node.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, dict):
            props = node.get("properties") or {}
            extra = node.get("additionalProperties")
            return {k: cls._typed(props.get(k, extra), v) for k, v in value.items()}
        if isinstance(value, list):
            return [cls._typed(node.get("items"), v) for v in value]
        return value

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
            result = program.evaluate({"self": celpy.json_to_cel(cel_escaped(value, node))})
            if not (isinstance(result, celpy.celtypes.BoolType) and bool(result)):
                found.append(f"{path or '(root)'}: {rule.get('message', rule['rule'])} (CEL: {rule['rule']})")
        if isinstance(value, dict):
            for key, sub in (node.get("properties") or {}).items():
                if key in value:
                    self._cel(sub, value[key], f"{path}.{key}" if path else key, found)
        if isinstance(value, list) and isinstance(node.get("items"), dict):
            for i, item in enumerate(value):
                self._cel(node["items"], item, f"{path}[{i}]", found)


# Property names the API server escapes in CEL (`self.__true__` is the property "true"): the CEL keywords.
CEL_RESERVED = {
    "true", "false", "null", "in", "as", "break", "const", "continue", "else", "for", "function", "if",
    "import", "let", "loop", "package", "namespace", "return", "var", "void", "while",
}


def cel_escaped(value: Any, node: Any = None) -> Any:
    """`value` with its object keys escaped as the API server does for CEL field selection: `__` ->
    `__underscores__`, `.` -> `__dot__`, `-` -> `__dash__`, `/` -> `__slash__`, a keyword -> `__kw__`.
    Only property names are escaped: the keys of a map (a schema with `additionalProperties`, such as
    `job.podLabels`) reach CEL as they are."""
    node = node if isinstance(node, dict) else {}
    if isinstance(value, list):
        return [cel_escaped(v, node.get("items")) for v in value]
    if not isinstance(value, dict):
        return value
    props = node.get("properties") or {}
    extra = node.get("additionalProperties")
    if isinstance(extra, dict) and not props:
        return {k: cel_escaped(v, extra) for k, v in value.items()}

    def escape(key: str) -> str:
        if key in CEL_RESERVED:
            return f"__{key}__"
        key = key.replace("__", "__underscores__")
        return key.replace(".", "__dot__").replace("-", "__dash__").replace("/", "__slash__")

    return {escape(k): cel_escaped(v, props.get(k)) for k, v in value.items()}


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


def role_kind(doc: dict) -> str:
    """Which rules a (Cluster)Role holds: the controller's (`main`), the leader election Lease's
    (`lease`), the JWK Set server's (`jwks`), or an aggregated default-role extension (`view`, `edit`)."""
    labels = doc.get("metadata", {}).get("labels", {})
    if labels.get("rbac.authorization.k8s.io/aggregate-to-view") == "true":
        return "view"
    if labels.get("rbac.authorization.k8s.io/aggregate-to-edit") == "true":
        return "edit"
    if any("leases" in r.get("resources", []) for r in doc.get("rules", [])):
        return "lease"
    if doc["metadata"]["name"].endswith("-jwks"):
        return "jwks"
    return "main"


# What the JWK Set server may do: read EpicExports, nothing else (it is the internet-facing process).
JWKS_RULES = {("fhirexport.dev", "epicexports", verb) for verb in ("get", "list", "watch")}


def commented_rules(text: str) -> list[dict]:
    """The rules commented out in a manifest (`  # - apiGroups: ...` and the `#   resources/verbs` lines
    after it), e.g. the key rotation rule of examples/operator.yaml."""
    lines, inside = [], False
    for line in text.splitlines():
        body = line.strip()
        if body.startswith("# - apiGroups:"):
            inside = True
        elif not (inside and body.startswith("#   ")):
            inside = False
        if inside:
            lines.append(body[2:])
    rules = yaml.safe_load("\n".join(lines)) if lines else []
    return rules if isinstance(rules, list) else []


def example_rbac() -> dict[str, set]:
    text = (EXAMPLES / "operator.yaml").read_text()
    docs = docs_of(text, "examples/operator.yaml")
    roles = [d for d in docs if d.get("kind") in ("ClusterRole", "Role")]
    rbac: dict[str, set] = {}
    for d in roles:
        rbac.setdefault(role_kind(d), set()).update(triples(d["rules"]))
    check(
        set(rbac) == {"main", "lease", "jwks", "view", "edit"},
        f"examples/operator.yaml: roles {sorted(rbac)}, expected the controller's, the Lease's, the JWK Set server's and the view and edit aggregates",
    )
    commented = triples(commented_rules(text))
    check(
        commented == ROTATION_RULES,
        f"examples/operator.yaml: the commented key rotation rule grants {sorted(commented)}, expected {sorted(ROTATION_RULES)}",
    )
    main = rbac.get("main", set())
    for resource in ("secrets", "configmaps"):
        for verb in ("list", "watch"):
            check(
                ("", resource, verb) not in main,
                f"examples/operator.yaml: the controller may {verb} {resource}: it reads them by name only (get)",
            )
    check(
        rbac.get("jwks") == JWKS_RULES,
        f"examples/operator.yaml: the JWK Set server's rules are {sorted(rbac.get('jwks', set()))}, expected only {sorted(JWKS_RULES)}",
    )
    for kind in ("view", "edit"):
        check(
            not any(r.endswith("/status") and v not in ("get", "list", "watch") for _, r, v in rbac.get(kind, set())),
            f"examples/operator.yaml: the {kind} aggregate may write epicexports/status (only the operator may: the JWK Set server publishes it)",
        )
    return rbac


# ---------------------------------------------------------------------------------------------------
# The chart


def find(docs: list[dict], kind: str, pred: Callable[[dict], bool] = lambda d: True) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind and pred(d)]


def labels_match(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_pod(where: str, dep: dict, image: str, sa_names: list[str], sa: str | None = None) -> dict:
    """What every pod of the chart must be: non-root, RuntimeDefault seccomp, one locked-down container
    with requests and a memory limit. Returns the container."""
    spec = dep["spec"]["template"]["spec"]
    psc = spec.get("securityContext", {})
    check(
        psc.get("runAsNonRoot") is True
        and psc.get("runAsUser") == UID
        and psc.get("seccompProfile", {}).get("type") == "RuntimeDefault",
        f"{where}: {name_of(dep)}: the pod is not non-root {UID} with the RuntimeDefault seccomp profile",
    )
    check(spec.get("serviceAccountName") in sa_names, f"{where}: {name_of(dep)}: its ServiceAccount is not in the chart")
    if sa is not None:
        check(spec.get("serviceAccountName") == sa, f"{where}: {name_of(dep)} runs as {spec.get('serviceAccountName')}, not {sa}")
    containers = spec["containers"]
    check(len(containers) == 1, f"{where}: {name_of(dep)}: expected one container")
    c = containers[0]
    check(c["image"] == image, f"{where}: {name_of(dep)}: image {c['image']!r}, expected {image!r}")
    csc = c.get("securityContext", {})
    check(
        csc.get("allowPrivilegeEscalation") is False
        and csc.get("readOnlyRootFilesystem") is True
        and csc.get("capabilities", {}).get("drop") == ["ALL"],
        f"{where}: {name_of(dep)}: the container may escalate, write its root file system or keep capabilities",
    )
    resources = c.get("resources", {})
    check(
        bool(resources.get("requests")) and "memory" in resources.get("limits", {}),
        f"{where}: {name_of(dep)}: the container has no requests or memory limit",
    )
    return c


def check_chart_objects(where: str, values: dict, docs: list[dict], rbac: dict[str, set]) -> None:
    merged_replicas = values.get("replicaCount", 1)
    watch = values.get("watchNamespace", "")
    image_values = values.get("image", {})
    repository = image_values.get("repository", "epic-export")
    if image_values.get("digest"):
        image = f"{repository}@{image_values['digest']}"
    else:
        image = f"{repository}:{image_values.get('tag') or chart_app_version()}"
    jwks = {**JWKS_DEFAULTS, **values.get("jwks", {})}
    ingress_values = jwks.get("ingress", {})

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
    operators = [d for d in deployments if not d["metadata"]["name"].endswith("-jwks")]
    jwks_deps = [d for d in deployments if d["metadata"]["name"].endswith("-jwks")]
    if not check(len(operators) == 1, f"{where}: expected one operator Deployment, got {len(operators)}"):
        return
    check(
        len(jwks_deps) == (1 if jwks["enabled"] else 0),
        f"{where}: {len(jwks_deps)} JWK Set server Deployment(s) with jwks.enabled={jwks['enabled']}",
    )
    dep = operators[0]
    pod = dep["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    jwks_pod_labels = [d["spec"]["template"]["metadata"]["labels"] for d in jwks_deps]
    check(labels_match(dep["spec"]["selector"]["matchLabels"], pod_labels), f"{where}: the Deployment selects no pod")
    for other in jwks_pod_labels:
        check(
            not labels_match(dep["spec"]["selector"]["matchLabels"], other),
            f"{where}: the operator Deployment's selector also selects the JWK Set server's pods",
        )
    check(dep["spec"]["replicas"] == merged_replicas, f"{where}: replicas is not {merged_replicas}")
    strategy = dep["spec"].get("strategy", {}).get("type")
    check(
        (strategy == "Recreate") == (merged_replicas == 1),
        f"{where}: strategy {strategy!r} with {merged_replicas} replica(s): Recreate exactly with one",
    )
    spec = pod["spec"]
    sa_names = [d["metadata"]["name"] for d in find(docs, "ServiceAccount")]
    c = check_pod(where, dep, image, sa_names)
    check(c.get("args") == ["controller", "--log-format", "json"], f"{where}: args {c.get('args')}")
    env = {e["name"]: e for e in c.get("env", [])}
    check(
        env.get("EPIC_EXPORT_IMAGE", {}).get("value") == (values.get("jobImage") or image),
        f"{where}: EPIC_EXPORT_IMAGE is {env.get('EPIC_EXPORT_IMAGE')}",
    )
    allowed = values.get("allowedJobImages", [])
    check(
        env.get("ALLOWED_JOB_IMAGES", {}).get("value") == (",".join(allowed) if allowed else None),
        f"{where}: ALLOWED_JOB_IMAGES is {env.get('ALLOWED_JOB_IMAGES')}, expected {allowed}",
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
    check(ports == {"metrics": port}, f"{where}: the operator's ports are {ports}, expected only metrics {port}")
    check(env.get("METRICS_ADDR", {}).get("value") == f"0.0.0.0:{port}", f"{where}: METRICS_ADDR")
    check(
        env.get("JWKS_MAX_AGE", {}).get("value") == str(jwks["maxAgeSeconds"]),
        f"{where}: the controller's JWKS_MAX_AGE (the rotation wait) is not jwks.maxAgeSeconds",
    )
    check(
        not {"JWKS_ADDR", "JWKS_ROTATION_MAX_AGE"} & set(env),
        f"{where}: the operator serves the JWK Set endpoint itself (only the jwks Deployment may)",
    )
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = c.get(probe, {}).get("httpGet", {})
        check(
            get.get("path") == path and get.get("port") in ("metrics", port),
            f"{where}: {probe} is not GET {path} on the metrics port",
        )

    # The JWK Set server: its own ServiceAccount, the same image, `jwks-server`, its env and ports.
    jwks_sa = None
    for jd in jwks_deps:
        jwks_sa = jd["spec"]["template"]["spec"].get("serviceAccountName")
        check(jwks_sa != spec.get("serviceAccountName"), f"{where}: the JWK Set server runs as the operator's ServiceAccount")
        check(labels_match(jd["spec"]["selector"]["matchLabels"], jd["spec"]["template"]["metadata"]["labels"]), f"{where}: {name_of(jd)} selects no pod")
        check(not labels_match(jd["spec"]["selector"]["matchLabels"], pod_labels), f"{where}: {name_of(jd)} selects the operator's pods")
        check(jd["spec"]["replicas"] == jwks.get("replicaCount", 1), f"{where}: {name_of(jd)} replicas")
        jc = check_pod(where, jd, image, sa_names)
        check(jc.get("args") == ["jwks-server", "--log-format", "json"], f"{where}: {name_of(jd)} args {jc.get('args')}")
        jenv = {e["name"]: e.get("value") for e in jc.get("env", [])}
        health = jwks.get("healthPort", 8080)
        want_env = {
            "JWKS_ADDR": f"0.0.0.0:{jwks['port']}",
            "JWKS_MAX_AGE": str(jwks["maxAgeSeconds"]),
            "JWKS_ROTATION_MAX_AGE": str(jwks["rotationMaxAgeSeconds"]),
            "HEALTH_ADDR": f"0.0.0.0:{health}",
        }
        got_env = {k: jenv.get(k) for k in want_env}
        check(got_env == want_env, f"{where}: the JWK Set server's env is {got_env}, expected {want_env}")
        check(jenv.get("WATCH_NAMESPACE") == (watch or None), f"{where}: the JWK Set server's WATCH_NAMESPACE is {jenv.get('WATCH_NAMESPACE')}")
        jports = {p["name"]: p["containerPort"] for p in jc.get("ports", [])}
        check(jports == {"jwks": jwks["port"], "health": health}, f"{where}: the JWK Set server's ports are {jports}")
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = jc.get(probe, {}).get("httpGet", {})
            check(get.get("path") == path and get.get("port") == "health", f"{where}: the JWK Set server's {probe} is not GET {path} on its health port")
    if jwks["enabled"]:
        check(jwks_sa in sa_names, f"{where}: the JWK Set server's ServiceAccount {jwks_sa} is not in the chart")

    # RBAC: the controller's rules, cluster-wide or in the watched namespace; the JWK Set server's
    # (read EpicExports only) likewise; the lease rules with leader election only; the aggregated
    # default-role extensions (cluster-wide) unless turned off; nothing else.
    main_rules = rbac.get("main", set())
    rotation = values.get("keyRotation", {}).get("enabled", False)
    if rotation:
        main_rules = main_rules | ROTATION_RULES
    aggregate = values.get("rbac", {}).get("aggregateToDefaultRoles", True)
    roles = find(docs, "ClusterRole") + find(docs, "Role")
    by_kind: dict[str, list[dict]] = {}
    for r in roles:
        by_kind.setdefault(role_kind(r), []).append(r)
    want_counts = {
        "main": 1,
        "jwks": 1 if jwks["enabled"] else 0,
        "lease": 1 if merged_replicas > 1 else 0,
        "view": 1 if aggregate else 0,
        "edit": 1 if aggregate else 0,
    }
    got_counts = {k: len(by_kind.get(k, [])) for k in want_counts}
    check(got_counts == want_counts, f"{where}: roles {got_counts}, expected {want_counts}")
    for kind in ("main", "jwks"):
        for r in by_kind.get(kind, []):
            if watch:
                check(
                    r["kind"] == "Role" and r["metadata"]["namespace"] == watch,
                    f"{where}: watchNamespace {watch}: {name_of(r)} must be a Role there",
                )
            else:
                check(r["kind"] == "ClusterRole", f"{where}: watching all namespaces needs a ClusterRole, not {name_of(r)}")
    for r in by_kind.get("main", []):
        got = triples(r["rules"])
        check(
            (("", "secrets", "update") in got) == rotation,
            f"{where}: {name_of(r)}: update on secrets must be granted exactly with keyRotation.enabled ({rotation})",
        )
        check(
            got == main_rules,
            f"{where}: {name_of(r)} differs from examples/operator.yaml: extra {sorted(got - main_rules)},"
            f" missing {sorted(main_rules - got)}",
        )
        check(
            not {("", "secrets", "list"), ("", "secrets", "watch")} & got,
            f"{where}: {name_of(r)} may list or watch Secrets (= read them all)",
        )
    for r in by_kind.get("jwks", []):
        check(triples(r["rules"]) == JWKS_RULES, f"{where}: {name_of(r)} grants {sorted(triples(r['rules']))}, expected only {sorted(JWKS_RULES)}")
    for kind in ("view", "edit"):
        for r in by_kind.get(kind, []):
            check(r["kind"] == "ClusterRole", f"{where}: {name_of(r)}: an aggregated role is a ClusterRole")
            check(triples(r["rules"]) == rbac.get(kind), f"{where}: {name_of(r)} differs from examples/operator.yaml")
    for r in by_kind.get("lease", []):
        check(
            r["kind"] == "Role" and r["metadata"]["namespace"] == RELEASE_NAMESPACE,
            f"{where}: the lease rules must be a Role in the release namespace",
        )
        check(triples(r["rules"]) == rbac.get("lease"), f"{where}: the lease rules differ from examples/operator.yaml")
    bindings = find(docs, "ClusterRoleBinding") + find(docs, "RoleBinding")
    bound_roles = [r for r in roles if role_kind(r) not in ("view", "edit")]
    check(len(bindings) == len(bound_roles), f"{where}: {len(bound_roles)} roles to bind but {len(bindings)} bindings")
    role_keys = {(r["kind"], r["metadata"]["name"], r["metadata"].get("namespace")): role_kind(r) for r in bound_roles}
    for b in bindings:
        ref = b["roleRef"]
        ns = b["metadata"].get("namespace") if ref["kind"] == "Role" else None
        kind = role_keys.get((ref["kind"], ref["name"], ns))
        check(kind is not None, f"{where}: {name_of(b)} binds a role not in the chart")
        sa = jwks_sa if kind == "jwks" else spec["serviceAccountName"]
        check(
            b["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": RELEASE_NAMESPACE}],
            f"{where}: {name_of(b)} does not bind exactly the ServiceAccount {sa}",
        )

    all_services = find(docs, "Service")
    services = [s for s in all_services if s["metadata"]["name"].endswith("-metrics")]
    jwks_services = [s for s in all_services if s["metadata"]["name"].endswith("-jwks")]
    check(len(services) == 1, f"{where}: expected one metrics Service")
    check(
        len(jwks_services) == (1 if jwks["enabled"] else 0) and len(all_services) == len(services) + len(jwks_services),
        f"{where}: Services {[name_of(s) for s in all_services]}, jwks.enabled={jwks['enabled']}",
    )
    for s in services:
        check(labels_match(s["spec"]["selector"], pod_labels), f"{where}: the metrics Service selects no pod")
        check(
            not any(labels_match(s["spec"]["selector"], other) for other in jwks_pod_labels),
            f"{where}: the metrics Service selects the JWK Set server's pods",
        )
        check(
            [p.get("targetPort") for p in s["spec"]["ports"]] == ["metrics"],
            f"{where}: the Service does not target the metrics port",
        )
    for s in jwks_services:
        check(
            bool(jwks_pod_labels) and all(labels_match(s["spec"]["selector"], other) for other in jwks_pod_labels),
            f"{where}: the jwks Service does not select the JWK Set server's pods",
        )
        check(not labels_match(s["spec"]["selector"], pod_labels), f"{where}: the jwks Service selects the operator's pods")
        check(
            [(p.get("name"), p.get("port"), p.get("targetPort")) for p in s["spec"]["ports"]]
            == [("http-jwks", jwks["port"], "jwks")],
            f"{where}: the jwks Service must expose only the jwks port: {s['spec']['ports']}",
        )
        want_type = jwks.get("service", {}).get("type", "ClusterIP")
        check(s["spec"].get("type") == want_type, f"{where}: the jwks Service's type is not {want_type}")

    # The Ingress of the JWK Set URL: /jwks/ only, to the jwks Service, with the host and TLS.
    ingresses = find(docs, "Ingress")
    want = jwks["enabled"] and ingress_values.get("enabled", False)
    check(len(ingresses) == (1 if want else 0), f"{where}: {len(ingresses)} Ingress(es), jwks ingress enabled={want}")
    for i in ingresses:
        host = ingress_values["host"]
        rules = i["spec"].get("rules", [])
        paths = [(r.get("host"), p) for r in rules for p in r.get("http", {}).get("paths", [])]
        check(
            [(h, p.get("path"), p.get("pathType")) for h, p in paths] == [(host, "/jwks/", "Prefix")],
            f"{where}: the Ingress must route exactly https://{host}/jwks/ (Prefix): {paths}",
        )
        backends = [p.get("backend", {}).get("service", {}) for _, p in paths]
        check(
            bool(jwks_services)
            and all(b.get("name") == jwks_services[0]["metadata"]["name"] and b.get("port") == {"name": "http-jwks"} for b in backends),
            f"{where}: the Ingress's backend is not the jwks Service's http-jwks port: {backends}",
        )
        check(
            i["spec"].get("defaultBackend") is None,
            f"{where}: the Ingress has a defaultBackend (only /jwks/ may be routed)",
        )
        secret = ingress_values.get("tls", {}).get("secretName", "")
        want_tls = [{"hosts": [host], "secretName": secret}] if secret else None
        check(i["spec"].get("tls") == want_tls, f"{where}: the Ingress's tls is {i['spec'].get('tls')}, expected {want_tls}")
        class_name = ingress_values.get("className") or None
        check(i["spec"].get("ingressClassName") == class_name, f"{where}: ingressClassName is not {class_name}")

    pdbs = find(docs, "PodDisruptionBudget")
    check(len(pdbs) == (1 if merged_replicas > 1 else 0), f"{where}: {len(pdbs)} PDB(s) with {merged_replicas} replica(s)")
    for p in pdbs:
        check(labels_match(p["spec"]["selector"]["matchLabels"], pod_labels), f"{where}: the PDB selects no pod")
        check(
            not any(labels_match(p["spec"]["selector"]["matchLabels"], other) for other in jwks_pod_labels),
            f"{where}: the PDB counts the JWK Set server's pods",
        )

    monitors = find(docs, "ServiceMonitor")
    want = values.get("metrics", {}).get("serviceMonitor", {}).get("enabled", False)
    check(len(monitors) == (1 if want else 0), f"{where}: {len(monitors)} ServiceMonitor(s), enabled={want}")
    for m in monitors:
        check(
            all(labels_match(m["spec"]["selector"]["matchLabels"], s["metadata"]["labels"]) for s in services),
            f"{where}: the ServiceMonitor does not select the metrics Service",
        )
        check(
            not any(labels_match(m["spec"]["selector"]["matchLabels"], s["metadata"]["labels"]) for s in jwks_services),
            f"{where}: the ServiceMonitor selects the jwks Service",
        )
        svc_ports = {p["name"] for s in services for p in s["spec"]["ports"]}
        check(
            all(e["port"] in svc_ports for e in m["spec"]["endpoints"]),
            f"{where}: the ServiceMonitor scrapes a port the Service lacks",
        )

    pod_monitors = find(docs, "PodMonitor")
    want_pm = want and jwks["enabled"]
    check(len(pod_monitors) == (1 if want_pm else 0), f"{where}: {len(pod_monitors)} PodMonitor(s), expected {int(want_pm)}")
    for pm in pod_monitors:
        check(
            bool(jwks_pod_labels) and all(labels_match(pm["spec"]["selector"]["matchLabels"], t) for t in jwks_pod_labels),
            f"{where}: the PodMonitor does not select the JWK Set server's pods",
        )
        check(not labels_match(pm["spec"]["selector"]["matchLabels"], pod_labels), f"{where}: the PodMonitor selects the operator's pods")
        jwks_ports = {
            p["name"]
            for d in find(docs, "Deployment", lambda d: d["metadata"]["name"].endswith("-jwks"))
            for c in d["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports", [])
        }
        check(
            [e["port"] for e in pm["spec"]["podMetricsEndpoints"]] == ["health"] and "health" in jwks_ports,
            f"{where}: the PodMonitor does not scrape the JWK Set server's health port",
        )
    for m in monitors:
        check(
            all(e.get("honorLabels") is True for e in m["spec"]["endpoints"]),
            f"{where}: the ServiceMonitor renames the metrics' namespace label (honorLabels is not true)",
        )
    check_monitoring(where, values, docs)

    # NetworkPolicies: the operator's pods (in: metrics; out: DNS, the API server, SMTP) and the JWK Set
    # server's (in: the JWKS port; out: DNS and the API server).
    policies = find(docs, "NetworkPolicy")
    np_values = values.get("networkPolicy", {})
    want = np_values.get("enabled", False)
    check(
        len(policies) == ((1 + (1 if jwks["enabled"] else 0)) if want else 0),
        f"{where}: {len(policies)} NetworkPolicy(ies), enabled={want}, jwks.enabled={jwks['enabled']}",
    )
    api_ports = np_values.get("apiServer", {}).get("ports", [443, 6443])
    cluster_egress = {(53, "UDP"), (53, "TCP")} | {(x, "TCP") for x in api_ports}
    smtp_ports = {(x, "TCP") for x in np_values.get("smtp", {}).get("ports", [587, 465])}
    for p in policies:
        selector = p["spec"]["podSelector"]["matchLabels"]
        for_jwks = p["metadata"]["name"].endswith("-jwks")
        targets = jwks_pod_labels if for_jwks else [pod_labels]
        check(
            bool(targets) and all(labels_match(selector, t) for t in targets),
            f"{where}: {name_of(p)} does not select its pods",
        )
        others = [pod_labels] if for_jwks else jwks_pod_labels
        check(not any(labels_match(selector, o) for o in others), f"{where}: {name_of(p)} selects the other Deployment's pods")
        check(sorted(p["spec"]["policyTypes"]) == ["Egress", "Ingress"], f"{where}: {name_of(p)} must restrict both ways")
        ingress_ports = [port for rule in p["spec"]["ingress"] for port in rule.get("ports", [])]
        want_ports = (
            [{"port": "jwks", "protocol": "TCP"}, {"port": "health", "protocol": "TCP"}]
            if for_jwks
            else [{"port": "metrics", "protocol": "TCP"}]
        )
        check(ingress_ports == want_ports, f"{where}: {name_of(p)} lets in {ingress_ports}, expected {want_ports}")
        if for_jwks:
            for rule in p["spec"]["ingress"]:
                port = rule["ports"][0]["port"]
                sources = np_values.get("jwksFrom" if port == "jwks" else "metricsFrom", [])
                check(rule.get("from", []) == sources, f"{where}: the jwks NetworkPolicy's sources for {port} are not those of its value")
        egress_ports = {(port["port"], port["protocol"]) for rule in p["spec"]["egress"] for port in rule["ports"]}
        want_egress = cluster_egress if for_jwks else cluster_egress | smtp_ports
        check(
            egress_ports == want_egress,
            f"{where}: {name_of(p)}'s egress is {sorted(egress_ports, key=str)}, expected {sorted(want_egress, key=str)}",
        )


_app_version: str | None = None


def check_monitoring(where: str, values: dict, docs: list[dict]) -> None:
    """The Grafana dashboard ConfigMap and the PrometheusRule: there exactly when enabled, labelled for
    the Grafana sidecar and the rule selector, holding the chart's files (tests/dashboards.rs checks
    their queries against the operator's metrics)."""
    dashboards = values.get("dashboards", {})
    maps = find(docs, "ConfigMap", lambda d: "grafana_dashboard" in d["metadata"].get("labels", {}))
    want = dashboards.get("enabled", False)
    check(len(maps) == (1 if want else 0), f"{where}: {len(maps)} dashboard ConfigMap(s), enabled={want}")
    source = json.loads((CHART / "dashboards" / "epic-export.json").read_text())
    for m in maps:
        labels = m["metadata"]["labels"]
        check(labels.get("grafana_dashboard") == "1", f"{where}: the dashboard ConfigMap's grafana_dashboard label is not \"1\"")
        for k, v in dashboards.get("labels", {}).items():
            check(labels.get(k) == v, f"{where}: the dashboard ConfigMap lacks the label {k}")
        for k, v in dashboards.get("annotations", {}).items():
            check(m["metadata"].get("annotations", {}).get(k) == v, f"{where}: the dashboard ConfigMap lacks the annotation {k}")
        check(
            m["metadata"]["namespace"] == (dashboards.get("namespace") or RELEASE_NAMESPACE),
            f"{where}: the dashboard ConfigMap is in the wrong namespace",
        )
        data = m.get("data", {})
        check(list(data) == ["epic-export.json"], f"{where}: the dashboard ConfigMap holds {list(data)}")
        try:
            rendered = json.loads(data.get("epic-export.json", ""))
            check(rendered == source, f"{where}: the dashboard ConfigMap differs from dashboards/epic-export.json")
            check(bool(rendered.get("panels")), f"{where}: the dashboard has no panels")
        except json.JSONDecodeError as e:
            check(False, f"{where}: the dashboard ConfigMap's JSON is invalid: {e}")

    rule_values = values.get("prometheusRule", {})
    rules = find(docs, "PrometheusRule")
    want = rule_values.get("enabled", False)
    check(len(rules) == (1 if want else 0), f"{where}: {len(rules)} PrometheusRule(s), enabled={want}")
    source = yaml.safe_load((CHART / "rules" / "epic-export.rules.yaml").read_text())
    base = rule_values.get("runbookBaseUrl", "")
    for r in rules:
        check(r["metadata"]["namespace"] == RELEASE_NAMESPACE, f"{where}: the PrometheusRule is not in the release namespace")
        for k, v in rule_values.get("labels", {}).items():
            check(r["metadata"]["labels"].get(k) == v, f"{where}: the PrometheusRule lacks the label {k}")
        groups = r["spec"].get("groups", [])
        check(
            [g["name"] for g in groups] == [g["name"] for g in source["groups"]],
            f"{where}: the PrometheusRule's groups differ from rules/epic-export.rules.yaml",
        )
        alerts = [rule for g in groups for rule in g.get("rules", [])]
        check(len(alerts) == sum(len(g["rules"]) for g in source["groups"]), f"{where}: the PrometheusRule lost rules")
        for rule in alerts:
            name = rule.get("alert", "?")
            check(isinstance(rule.get("expr"), str) and bool(rule["expr"].strip()), f"{where}: {name} has no expr")
            annotations = rule.get("annotations", {})
            check(
                all(annotations.get(k) for k in ("summary", "description", "runbook_url")),
                f"{where}: {name} lacks a summary, description or runbook_url",
            )
            check(
                annotations.get("runbook_url") == f"{base}monitoring.html#{name.lower()}",
                f"{where}: {name}'s runbook_url is {annotations.get('runbook_url')}",
            )
            check("kubectl " in annotations.get("description", ""), f"{where}: {name}'s description has no kubectl command")
            check("{{ $labels" in annotations.get("summary", "") or "Operator" in name or "NoLeader" in name,
                  f"{where}: {name}'s summary names no export")


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


# Value sets checked beside ci/*-values.yaml (not installed by `ct install`): the Ingress without TLS
# (NOTES.txt must warn) and key rotation in one namespace (the rule goes into the Role there).
EXTRA_VALUE_SETS: list[tuple[str, dict]] = [
    (
        "chart with an Ingress without TLS, key rotation in one namespace",
        {
            "watchNamespace": "phi",
            "keyRotation": {"enabled": True},
            "jwks": {"service": {"type": "LoadBalancer"}, "ingress": {"enabled": True, "host": "keys.example.org"}},
        },
    ),
    (
        "chart with the Grafana dashboard and the alert rules",
        {
            "metrics": {"serviceMonitor": {"enabled": True}},
            "dashboards": {"enabled": True, "labels": {"team": "integration"}, "annotations": {"grafana_folder": "FHIR"}},
            "prometheusRule": {
                "enabled": True,
                "labels": {"release": "prometheus"},
                "runbookBaseUrl": "https://docs.example.org/epic-export/",
            },
        },
    ),
]


def check_notes(where: str, values: dict, text: str) -> None:
    check("kubectl" in text, f"{where}: NOTES.txt says nothing useful")
    jwks = {**JWKS_DEFAULTS, **values.get("jwks", {})}
    ingress = jwks.get("ingress", {}) if jwks["enabled"] else {}
    if ingress.get("enabled"):
        url = f"https://{ingress['host']}/jwks/<namespace>/<export>.json"
        check(url in text, f"{where}: NOTES.txt does not give the JWK Set URL {url}")
        warns = "Epic requires https" in text
        tls = bool(ingress.get("tls", {}).get("secretName"))
        check(warns != tls, f"{where}: NOTES.txt {'warns' if warns else 'does not warn'} about https with tls.secretName={tls}")
    else:
        check("https://" not in text, f"{where}: NOTES.txt gives an https URL without an Ingress")
    check(
        ("port-forward svc/" in text) == (jwks["enabled"] and not ingress.get("enabled", False)),
        f"{where}: NOTES.txt's port-forward hint does not match jwks.enabled/jwks.ingress.enabled",
    )
    check(
        "mounts a\nSecret of that namespace" in text and "Who may create EpicExports" in text,
        f"{where}: NOTES.txt does not state who may create EpicExports",
    )
    aggregate = values.get("rbac", {}).get("aggregateToDefaultRoles", True)
    check(
        ("`edit` and `admin`" in text) == aggregate,
        f"{where}: NOTES.txt does not say whether EpicExports are in the default roles ({aggregate})",
    )
    rotation = values.get("keyRotation", {}).get("enabled", False)
    check(
        ("Key rotation: allowed" in text) == rotation and ("Key rotation: off" in text) != rotation,
        f"{where}: NOTES.txt does not say whether key rotation is allowed ({rotation})",
    )


def check_example_jwks(chart_docs: list[dict]) -> None:
    """examples/operator.yaml runs the JWK Set server like the chart's defaults: `jwks-server` with the
    same env and ports, behind a Service exposing only the JWKS port and selecting only its pods."""
    where = "examples/operator.yaml"
    docs = docs_of((EXAMPLES / "operator.yaml").read_text(), where)

    def jwks_of(ds: list[dict]) -> tuple:
        dep = next((d for d in ds if d.get("kind") == "Deployment" and d["metadata"]["name"].endswith("-jwks")), None)
        if dep is None:
            return ("no JWK Set server Deployment",)
        c = dep["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in c.get("env", []) if e["name"] != "RUST_LOG"}
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        svc = [
            ([(p.get("port"), p.get("targetPort")) for p in d["spec"]["ports"]], labels_match(d["spec"]["selector"], pod_labels))
            for d in ds
            if d.get("kind") == "Service" and d["metadata"]["name"].endswith("-jwks")
        ]
        operator = next(d for d in ds if d.get("kind") == "Deployment" and not d["metadata"]["name"].endswith("-jwks"))
        op_env = {e["name"] for e in operator["spec"]["template"]["spec"]["containers"][0].get("env", [])}
        return c.get("args"), env, ports, svc, sorted(op_env & {"JWKS_ADDR", "JWKS_ROTATION_MAX_AGE"})

    chart, example = jwks_of(chart_docs), jwks_of(docs)
    check(example == chart, f"{where}: the JWK Set server (args, env, ports, Service) {example} differs from the chart's defaults {chart}")


def check_chart(crd: CrdValidator, rbac: dict[str, set]) -> None:
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
    check(len(value_files) >= 5, "charts/epic-export-operator/ci: expected at least five value sets")
    value_sets = [(f"chart with {p.relative_to(CHART)}", yaml.safe_load(p.read_text()) or {}) for p in value_files]
    value_sets += EXTRA_VALUE_SETS
    for where, values in value_sets:
        lint(values, where)
        try:
            rendered = render(values)
        except helm.HelmError as e:
            check(False, f"{where}: render failed: {e}")
            continue
        docs: list[dict] = []
        for template, text in sorted(rendered.items()):
            if template.endswith("NOTES.txt"):
                check_notes(where, values, text)
                continue
            docs += docs_of(text, f"{where}: {template}")
        for doc in docs:
            validate_object(doc, where, crd)
        check_chart_objects(where, values, docs, rbac)
        if not values:
            check_example_jwks(docs)

    # Values the schema or the templates must refuse.
    for bad in (
        {"watchNamespaces": ["phi"]},
        {"watchNamespace": "phi,other"},
        {"replicaCount": 0},
        {"image": {"repository": "x", "tg": "1"}},
        {"serviceAccount": {"create": False}},
        {"networkPolicy": {"enabled": True, "apiServer": {"ports": []}}},
        {"jwks": {"ingress": {"enabled": True}}},
        {"jwks": {"ingress": {"enabled": True, "host": ""}}},
        {"jwks": {"ingress": {"enabled": True, "host": "https://jwks.example.org/"}}},
        {"jwks": {"enabled": False, "ingress": {"enabled": True, "host": "jwks.example.org"}}},
        {"jwks": {"port": 0}},
        {"jwks": {"port": 65536}},
        {"jwks": {"port": 8080}},
        {"jwks": {"prot": 8081}},
        {"jwks": {"ingress": {"tls": {"secret": "x"}}}},
        {"jwks": {"maxAgeSeconds": 0}},
        {"jwks": {"rotationMaxAgeSeconds": -1}},
        {"jwks": {"service": {"type": "ExternalName"}}},
        {"keyRotation": {"enabled": "yes"}},
        {"keyRotation": True},
        {"jwks": {"healthPort": 8081}},
        {"jwks": {"maxAgeSeconds": 104401}},
        {"jwks": {"replicaCount": 0}},
        {"jwks": {"serviceAccount": {"create": False}}},
        {"jwks": {"serviceAccount": {"nmae": "x"}}},
        {"allowedJobImages": "registry.example.org/epic-export@sha256:*"},
        {"allowedJobImages": ["*"]},
        {"allowedJobImages": ["a*b"]},
        {"allowedJobImages": ["a,b"]},
        {"rbac": {"aggregateToDefaultRoles": "no"}},
        {"networkPolicy": {"smtp": {"ports": [0]}}},
        {"networkPolicy": {"smtp": {"port": [587]}}},
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

    def email(extra: dict) -> Callable[[dict], None]:
        def change(d: dict) -> None:
            d["spec"]["notify"] = {"email": {"host": "smtp.example.org", "from": "a@example.org", "to": ["b@example.org"], **extra}}

        return change

    # YAML 1.1 reads a bare `on:` as the boolean key true: both spellings are refused, naming sendOn.
    broken(email({"on": ["failure"]}), "write sendOn")
    broken(email({"true": ["failure"]}), "write sendOn")
    broken(email({"sendOn": ["failed"]}), "sendOn lists success, partial or failure")
    broken(email({"tls": "none", "smtpSecretRef": {"name": "smtp"}}), "notify.email.tls: none sends the smtpSecretRef credentials")
    broken(email({"tls": "plain"}), "notify.email.tls is none, starttls or tls")
    broken(email({"port": 0}), "less than the minimum")
    broken(lambda d: d["spec"]["output"].update(subPath="../other"), "output.subPath must be a relative path")
    broken(lambda d: d["spec"]["output"].update(subPath="/etc"), "output.subPath must be a relative path")
    broken(lambda d: d["spec"].update(limits={"requestsPerSecond": 0.001}), "limits.requestsPerSecond")
    broken(lambda d: d["spec"].update(limits={"requestsPerSecond": 1001}), "greater than the maximum")
    broken(lambda d: d["spec"].update(job={"backoffLimit": -1}), "less than the minimum")
    broken(lambda d: d["spec"].update(job={"activeDeadlineSeconds": 0}), "less than the minimum")
    broken(lambda d: d["spec"]["auth"].update(keySecretRef={"name": "", "key": "private.pem"}), "name the Secret")
    broken(lambda d: d["spec"]["auth"].update(rotation={"every": "90 days"}), "auth.rotation.every")

    def output(o: dict) -> Callable[[dict], None]:
        return lambda d: d["spec"].update(output=o)

    # spec.output: a volume or an object store, never both or neither; each option with its own kind.
    exactly_one = "set exactly one of output.volumeClaimName"
    broken(output({"volumeClaimName": "exports", "url": "s3://phi-exports/epic"}), exactly_one)
    broken(output({"keepRuns": 3}), exactly_one)
    broken(output({"url": "file:///data/exports"}), "output.url is s3://bucket/prefix")
    broken(output({"url": "s3://phi-exports/epic", "subPath": "nightly"}), "output.subPath is a folder in the volume")
    broken(output({"volumeClaimName": "exports", "credentialsSecretRef": {"name": "s3"}}), "go with output.url")
    broken(output({"volumeClaimName": "exports", "endpoint": "https://minio.example.org"}), "go with output.url")
    broken(output({"url": "s3://phi-exports/epic", "compression": "zip"}), "output.compression is none or gzip")
    broken(output({"url": "s3://phi-exports/epic", "partSize": 1024}), "less than the minimum")
    broken(output({"url": "s3://phi-exports/epic", "uploadConcurrency": 65}), "greater than the maximum")
    broken(output({"url": "s3://phi-exports/epic", "scratchSizeLimit": "lots"}), "output.scratchSizeLimit")
    broken(output({"volumeClaimName": ""}), "name the PersistentVolumeClaim")
    broken(lambda d: d["spec"].update(job={"podLabels": {"fhirexport.dev/export": "x"}}), "job.podLabels cannot set")

    def bulk(extra: dict) -> Callable[[dict], None]:
        def change(d: dict) -> None:
            d["spec"]["source"] = {"bulk": {"level": "system", **extra}}

        return change

    broken(bulk({"maxWaitHours": 0}), "source.bulk.maxWaitHours must be more than 0")
    broken(bulk({"maxWaitHours": 9000}), "greater than the maximum")
    broken(bulk({"fileHosts": ["https://storage.example.org/path"]}), "source.bulk.fileHosts")
    broken(bulk({"tokenHosts": ["storage.example.org"]}), "source.bulk.tokenHosts")
    # And what must pass: the rules do not refuse good values (an int where a number is expected too).
    for good in (
        email({"sendOn": ["failure"], "tls": "none", "host": "127.0.0.1", "smtpSecretRef": {"name": "smtp"}}),
        email({"caCertRef": {"configMapName": "smtp-ca", "key": "ca.pem"}}),
        lambda d: d["spec"].update(limits={"requestsPerSecond": 10}),
        lambda d: d["spec"].update(limits={"requestsPerSecond": 0}),
        bulk({"maxWaitHours": 72, "fileHosts": ["https://storage.example.org"]}),
        lambda d: d["spec"]["output"].update(subPath="a/..b"),
        output({"volumeClaimName": "exports", "compression": "gzip"}),
        output(
            {
                "url": "az://exports/epic",
                "compression": "none",
                "partSize": 8388608,
                "uploadConcurrency": 4,
                "credentialsSecretRef": {"name": "azure"},
                "scratchSizeLimit": "4Gi",
                "keepRuns": 10,
            }
        ),
        output({"url": "gs://phi-exports"}),
        lambda d: d["spec"].update(job={"podLabels": {"azure.workload.identity/use": "true"}}),
    ):
        doc = copy.deepcopy(export)
        good(doc)
        errors = crd.errors(doc)
        check(not errors, f"positive check: a valid EpicExport was refused: {errors}")


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
