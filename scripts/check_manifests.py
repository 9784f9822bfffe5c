#!/usr/bin/env python3
"""Offline checks of the Helm chart and the example manifests (run by scripts/check-manifests.sh).

- The chart: `helm lint --strict` (Helm's SDK through helm-python-sdk, no helm binary) with its defaults
  and each ci/*-values.yaml; rendered with each of them, every object validated strictly (unknown fields
  are errors) against the Kubernetes schemas of the oldest supported and the newest known version
  (kubernetes-validate); what each value set must produce (RBAC scope, leader election, strategy, PDB,
  ServiceMonitor, NetworkPolicy, security settings, probes, env, the JWK Set endpoint's Service and
  Ingress, NOTES.txt); its RBAC rules are exactly those of examples/operator.yaml (plus, with
  keyRotation.enabled, the key rotation rule commented out there); its CRD is byte-identical to
  crds/epicexport.yaml; bad values are refused.
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
# Granted only with the chart's keyRotation.enabled (commented out in examples/operator.yaml).
ROTATION_RULES = {("", "secrets", "update")}
# The chart's JWK Set endpoint defaults (values.yaml).
JWKS_DEFAULTS = {"enabled": True, "port": 8081, "maxAgeSeconds": 3600, "rotationMaxAgeSeconds": 300}

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


def example_rbac() -> tuple[set, set]:
    text = (EXAMPLES / "operator.yaml").read_text()
    docs = docs_of(text, "examples/operator.yaml")
    roles = [d for d in docs if d.get("kind") in ("ClusterRole", "Role")]
    main = triples(r for d in roles if not is_lease_role(d) for r in d["rules"])
    leases = triples(r for d in roles if is_lease_role(d) for r in d["rules"])
    check(bool(main) and bool(leases), "examples/operator.yaml: no controller or lease rules found")
    commented = triples(commented_rules(text))
    check(
        commented == ROTATION_RULES,
        f"examples/operator.yaml: the commented key rotation rule grants {sorted(commented)}, expected {sorted(ROTATION_RULES)}",
    )
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
    jwks = {**JWKS_DEFAULTS, **values.get("jwks", {})}
    ingress_values = jwks.get("ingress", {})
    jwks_env = {k: env[k].get("value") for k in ("JWKS_ADDR", "JWKS_MAX_AGE", "JWKS_ROTATION_MAX_AGE") if k in env}
    if jwks["enabled"]:
        want_env = {
            "JWKS_ADDR": f"0.0.0.0:{jwks['port']}",
            "JWKS_MAX_AGE": str(jwks["maxAgeSeconds"]),
            "JWKS_ROTATION_MAX_AGE": str(jwks["rotationMaxAgeSeconds"]),
        }
        check(jwks_env == want_env, f"{where}: the JWKS env is {jwks_env}, expected {want_env}")
        check(ports.get("jwks") == jwks["port"], f"{where}: the jwks container port is not {jwks['port']}")
    else:
        check(not jwks_env, f"{where}: jwks.enabled=false but the JWKS env is set: {jwks_env}")
        check("jwks" not in ports, f"{where}: jwks.enabled=false but the container has a jwks port")

    # RBAC: the controller's rules, cluster-wide or in the watched namespace; the lease rules with
    # leader election only; nothing else.
    main_rules, lease_rules = rbac
    rotation = values.get("keyRotation", {}).get("enabled", False)
    if rotation:
        main_rules = main_rules | ROTATION_RULES
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
            (("", "secrets", "update") in got) == rotation,
            f"{where}: {name_of(r)}: update on secrets must be granted exactly with keyRotation.enabled ({rotation})",
        )
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
            [p.get("targetPort") for p in s["spec"]["ports"]] == ["metrics"],
            f"{where}: the Service does not target the metrics port",
        )
    for s in jwks_services:
        check(labels_match(s["spec"]["selector"], pod_labels), f"{where}: the jwks Service selects no pod")
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

    policies = find(docs, "NetworkPolicy")
    want = values.get("networkPolicy", {}).get("enabled", False)
    check(len(policies) == (1 if want else 0), f"{where}: {len(policies)} NetworkPolicy(ies), enabled={want}")
    for p in policies:
        check(labels_match(p["spec"]["podSelector"]["matchLabels"], pod_labels), f"{where}: the NetworkPolicy selects no pod")
        check(sorted(p["spec"]["policyTypes"]) == ["Egress", "Ingress"], f"{where}: the NetworkPolicy must restrict both ways")
        ingress_ports = [port for rule in p["spec"]["ingress"] for port in rule.get("ports", [])]
        want_ports = [{"port": "metrics", "protocol": "TCP"}] + ([{"port": "jwks", "protocol": "TCP"}] if jwks["enabled"] else [])
        check(
            ingress_ports == want_ports,
            f"{where}: the NetworkPolicy lets in {ingress_ports}, expected {want_ports}",
        )
        jwks_from = values.get("networkPolicy", {}).get("jwksFrom", [])
        for rule in p["spec"]["ingress"]:
            if rule.get("ports") == [{"port": "jwks", "protocol": "TCP"}]:
                check(rule.get("from", []) == jwks_from, f"{where}: the NetworkPolicy's jwks sources are not networkPolicy.jwksFrom")
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
    rotation = values.get("keyRotation", {}).get("enabled", False)
    check(
        ("Key rotation: allowed" in text) == rotation and ("Key rotation: off" in text) != rotation,
        f"{where}: NOTES.txt does not say whether key rotation is allowed ({rotation})",
    )


def check_example_jwks(chart_docs: list[dict]) -> None:
    """examples/operator.yaml serves the JWK Set endpoint like the chart's defaults: same env, port and
    a Service exposing only that port."""
    where = "examples/operator.yaml"
    docs = docs_of((EXAMPLES / "operator.yaml").read_text(), where)

    def jwks_of(ds: list[dict]) -> tuple[dict, dict, list]:
        dep = next(d for d in ds if d.get("kind") == "Deployment")
        c = dep["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in c.get("env", []) if e["name"].startswith("JWKS_")}
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", []) if p["name"] == "jwks"}
        svc = [
            [(p.get("port"), p.get("targetPort")) for p in d["spec"]["ports"]]
            for d in ds
            if d.get("kind") == "Service" and d["metadata"]["name"].endswith("-jwks")
        ]
        return env, ports, svc

    chart, example = jwks_of(chart_docs), jwks_of(docs)
    check(example == chart, f"{where}: the JWK Set endpoint (env, port, Service) {example} differs from the chart's defaults {chart}")


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
