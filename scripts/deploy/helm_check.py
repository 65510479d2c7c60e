"""Offline checks of helm/trellis with the real Helm v4 library (helm-sdkpy).

For the default values and each helm/trellis/ci/*-values.yaml:
  * `helm lint` (Lint action; the chart's values.yaml is replaced by the merged values, since
    the library's lint takes no values argument), no errors allowed;
  * a real `helm install` (Install action: values schema, templates, hooks, ordering) into a
    fake in-memory Kubernetes API on loopback (fake_kube_api.py); the manifests Helm rendered
    are read back from the release record Helm stored;
  * every rendered object validated with kubernetes-validate (strict: unknown fields are
    errors) for the chosen Kubernetes version, plus the chart's own policies (non-root,
    resource requests, gRPC probes, GPU requests...).
Negative cases (scripts/deploy/negative/*.yaml) must be refused with the expected message.
Prints one line per check; exits 1 if any failed.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
failures = 0


def report(ok: bool, name: str, detail: str = "") -> None:
    global failures
    if not ok:
        failures += 1
    line = f"{'ok  ' if ok else 'FAIL'} {name}"
    if detail:
        line += f" — {detail}"
    print(line, flush=True)


def coalesce(base, overlay):
    """Helm's values merge: maps merge recursively, null deletes, anything else replaces."""
    if not isinstance(base, dict) or not isinstance(overlay, dict):
        return copy.deepcopy(overlay)
    out = copy.deepcopy(base)
    for k, v in overlay.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = coalesce(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def split_docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def pod_spec(obj: dict) -> dict | None:
    kind = obj.get("kind")
    if kind == "Pod":
        return obj.get("spec")
    if kind in ("Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet"):
        return obj["spec"]["template"]["spec"]
    return None


def tls_problems(by_kind: dict[str, list[dict]], values: dict) -> list[str]:
    """mTLS (issue 11): with certificates configured, every Trellis process gets its flags and
    files and nothing runs plaintext; without, the coordinator says --insecure. NetworkPolicies:
    one per component, a rule per port."""
    problems = []
    tls = values["tls"]
    on = bool(tls["existingSecret"]) or tls["certManager"]["enabled"]
    bundled = values["etcd"]["bundled"]["enabled"]
    full = {o["metadata"]["name"]: o for k in ("Deployment", "StatefulSet", "Job", "Pod") for o in by_kind.get(k, [])}

    def containers(suffix: str) -> list[dict]:
        return [c for n, o in full.items() if n.endswith(suffix) for c in pod_spec(o)["containers"]]

    def volume(suffix: str) -> dict | None:
        for n, o in full.items():
            if n.endswith(suffix):
                return next((v for v in pod_spec(o).get("volumes", []) if v["name"] == "tls"), None)
        return None

    def files(vol: dict | None) -> set[str]:
        out = set()
        for src in (vol or {}).get("projected", {}).get("sources", []):
            out |= {i["path"] for i in src["secret"].get("items", [])}
        return out

    coord = containers("-coordinator")
    args = coord[0]["args"] if coord else []
    if on:
        for flag in ("--tls-cert", "--tls-key", "--client-ca", "--allowed-root"):
            if flag not in args:
                problems.append(f"TLS configured but the coordinator lacks {flag}")
        if "--insecure" in args:
            problems.append("TLS configured but the coordinator still passes --insecure")
        worker = next((o for n, o in full.items() if n.endswith("-worker")), None)
        wargs = pod_spec(worker)["containers"][0]["args"] if worker else []
        if not all(f in wargs for f in ("--tls-cert", "--tls-key", "--ca")) or not wargs[1].startswith("https://"):
            problems.append(f"TLS configured but worker args are {wargs}")
        wname = worker["metadata"]["name"] if worker else "?"
        want = {"ca.crt"} | {f"worker-{wname}-{i}.{x}" for i in range(values["worker"]["replicas"]) for x in ("crt", "key")}
        if not want <= files(volume("-worker")):
            problems.append(f"worker pods do not mount {sorted(want - files(volume('-worker')))}")
        want = {"ca.crt", "coordinator.crt", "coordinator.key"} | ({"etcd-client.crt", "etcd-client.key"} if bundled else set())
        if not want <= files(volume("-coordinator")):
            problems.append(f"the coordinator does not mount {sorted(want - files(volume('-coordinator')))}")
        if bundled:
            store = args[args.index("--store") + 1] if "--store" in args else ""
            if not store.startswith("etcd:https://") or "--etcd-cert" not in args:
                problems.append(f"bundled etcd with TLS: coordinator --store {store!r} without https:// or --etcd-cert")
            eargs = (containers("-etcd") or [{"args": []}])[0]["args"]
            for a in ("--client-cert-auth", "--listen-client-urls=https://0.0.0.0:2379"):
                if a not in eargs:
                    problems.append(f"bundled etcd lacks {a}")
        submit = [c for n, o in full.items() if "-submit-" in n for c in pod_spec(o)["containers"]]
        if values["job"]["submit"] and not submit:
            problems.append("no submit Job")
        for c in submit:
            env = {e["name"] for e in c.get("env", [])}
            if not {"TRELLIS_CA", "TRELLIS_CERT", "TRELLIS_KEY"} <= env:
                problems.append("the submit Job's coordctl has no certificate")
        test = [p for p in by_kind.get("Pod", []) if (p["metadata"].get("annotations") or {}).get("helm.sh/hook") == "test"]
        if test and "-tls" not in test[0]["spec"]["containers"][0]["command"]:
            problems.append("the helm test probe does not use TLS")
        certs = by_kind.get("Certificate", [])
        if tls["certManager"]["enabled"]:
            want = 2 + values["worker"]["replicas"] + (2 if bundled else 0)
            if len(certs) != want:
                problems.append(f"expected {want} cert-manager Certificates, got {len(certs)}")
            for cert in certs:
                if cert["spec"]["issuerRef"]["name"] != tls["certManager"]["issuerRef"]["name"]:
                    problems.append(f"Certificate/{cert['metadata']['name']} has another issuer")
        elif certs:
            problems.append("cert-manager Certificates rendered without tls.certManager.enabled")
    elif "--insecure" not in args:
        problems.append("no certificates configured but the coordinator lacks --insecure")
    nps = {o["metadata"]["name"]: o for o in by_kind.get("NetworkPolicy", [])}
    if values["networkPolicy"]["enabled"]:
        ports = {n: [p["port"] for r in o["spec"].get("ingress", []) for p in r.get("ports", [])] for n, o in nps.items()}
        want = {"-coordinator": ["grpc"] + (["metrics"] if values["networkPolicy"]["prometheus"] else []),
                "-worker": ["ring", "ring-tp"]}
        if bundled:
            want["-etcd"] = ["client", "peer"] + (["etcd-metrics"] if values["networkPolicy"]["prometheus"] else [])
        for suffix, w in want.items():
            got = [p for n, p in ports.items() if n.endswith(suffix)]
            if got != [w]:
                problems.append(f"NetworkPolicy *{suffix}: ingress ports {got}, expected {w}")
    elif nps:
        problems.append("NetworkPolicies rendered with networkPolicy.enabled=false")
    return problems


def policy_problems(objs: list[dict], values: dict) -> list[str]:
    """The chart's own rules, checked on what Helm rendered."""
    problems = []
    by_kind: dict[str, list[dict]] = {}
    for o in objs:
        by_kind.setdefault(o["kind"], []).append(o)
        name = f"{o['kind']}/{o['metadata']['name']}"
        if len(o["metadata"]["name"]) > 63:
            problems.append(f"{name}: name longer than 63 characters")
        spec = pod_spec(o)
        if spec is None:
            continue
        psc = spec.get("securityContext") or {}
        if psc.get("runAsNonRoot") is not True:
            problems.append(f"{name}: pod securityContext.runAsNonRoot is not true")
        for c in spec.get("initContainers", []) + spec.get("containers", []):
            cname = f"{name} container {c['name']}"
            req = (c.get("resources") or {}).get("requests") or {}
            if "cpu" not in req or "memory" not in req:
                problems.append(f"{cname}: no cpu and memory requests")
            sc = c.get("securityContext") or {}
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{cname}: allowPrivilegeEscalation is not false")
            if (sc.get("capabilities") or {}).get("drop") != ["ALL"]:
                problems.append(f"{cname}: capabilities are not dropped")
            rorf_expected = not (c["name"] == "worker" and not values["worker"]["readOnlyRootFilesystem"])
            if rorf_expected and sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{cname}: root filesystem is not read-only")
    deps = [d for d in by_kind.get("Deployment", []) if d["metadata"]["name"].endswith("-coordinator")]
    if len(deps) != 1:
        problems.append("expected exactly one coordinator Deployment")
    else:
        c = deps[0]["spec"]["template"]["spec"]["containers"][0]
        port = values["coordinator"]["grpcPort"]
        # Native gRPC probes cannot present a client certificate: TCP probes with mTLS.
        tls = bool(values["tls"]["existingSecret"]) or values["tls"]["certManager"]["enabled"]
        kind = "tcpSocket" if tls else "grpc"
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if (c.get(probe) or {}).get(kind, {}).get("port") != port:
                problems.append(f"coordinator {probe} is not a {kind} probe on port {port}")
        args = c.get("args", [])
        store = args[args.index("--store") + 1] if "--store" in args else ""
        if not store.startswith("etcd:http"):
            problems.append(f"coordinator --store is {store!r}, expected etcd:URL")
        if {p["name"]: p["containerPort"] for p in c.get("ports", [])} != {"grpc": port, "metrics": values["coordinator"]["metricsPort"]}:
            problems.append("coordinator ports are not grpc + metrics")
    sts = {s["metadata"]["name"]: s for s in by_kind.get("StatefulSet", [])}
    workers = [s for n, s in sts.items() if n.endswith("-worker")]
    if len(workers) != 1:
        problems.append("expected exactly one worker StatefulSet")
    else:
        w = workers[0]
        spec = w["spec"]["template"]["spec"]
        c = spec["containers"][0]
        if c["args"][:2] != ["--coordinator", c["args"][1]] or not c["args"][1].startswith(("http://", "https://")) or "--device" not in c["args"]:
            problems.append(f"worker args {c['args']} are not --coordinator http(s)://... --device ...")
        gpu = values["worker"]["gpuResourceName"]
        wants_gpu = values["worker"]["device"].startswith("cuda")
        has_gpu = gpu in (c["resources"].get("limits") or {}) and gpu in c["resources"]["requests"]
        if wants_gpu != has_gpu:
            problems.append(f"worker GPU request ({gpu}) {'missing' if wants_gpu else 'present on a cpu worker'}")
        elif wants_gpu:
            n = str(values["worker"]["gpusPerWorker"])
            if c["resources"]["limits"][gpu] != n or c["resources"]["requests"][gpu] != n:
                problems.append(f"worker {gpu} request/limit {c['resources']['requests'][gpu]}/{c['resources']['limits'][gpu]}, expected {n}")
            if c["args"][c["args"].index("--device") + 1] != values["worker"]["device"]:
                problems.append(f"worker --device is not {values['worker']['device']}")
        # GPU node placement comes from the values as given
        for key in ("nodeSelector", "tolerations"):
            if (spec.get(key) or type(values["worker"][key])()) != values["worker"][key]:
                problems.append(f"worker pod {key} {spec.get(key)!r} is not the values' {values['worker'][key]!r}")
        if w["spec"]["replicas"] != values["worker"]["replicas"]:
            problems.append(f"worker StatefulSet replicas {w['spec']['replicas']}, expected {values['worker']['replicas']}")
        if spec.get("terminationGracePeriodSeconds", 30) < 60:
            problems.append("worker terminationGracePeriodSeconds is below 60 s")
        svc = [s for s in by_kind.get("Service", []) if s["metadata"]["name"] == w["spec"]["serviceName"]]
        if not svc or svc[0]["spec"].get("clusterIP") != "None":
            problems.append("worker StatefulSet has no headless Service")
    # the job spec the coordinator and the submit Job read is the values' spec, verbatim
    jobs = [c for c in by_kind.get("ConfigMap", []) if c["metadata"]["name"].endswith("-job")]
    if len(jobs) != 1 or jobs[0]["data"].get("job.toml", "").strip() != values["job"]["spec"].strip():
        problems.append("the job ConfigMap's job.toml is not the values' job.spec")
    etcd_sts = [s for n, s in sts.items() if n.endswith("-etcd")]
    if values["etcd"]["bundled"]["enabled"] != bool(etcd_sts):
        problems.append("bundled etcd StatefulSet present/absent contrary to etcd.bundled.enabled")
    if values["grafana"]["dashboards"]["enabled"]:
        dash = [c for c in by_kind.get("ConfigMap", []) if "-dashboard-" in c["metadata"]["name"]]
        if len(dash) < 2:
            problems.append("expected the Grafana dashboard ConfigMaps")
        for cm in dash:
            if (cm["metadata"].get("labels") or {}).get("grafana_dashboard") != "1":
                problems.append(f"ConfigMap/{cm['metadata']['name']} lacks the label grafana_dashboard: \"1\"")
            for k, v in cm["data"].items():
                json.loads(v)
    tests = [p for p in by_kind.get("Pod", []) if (p["metadata"].get("annotations") or {}).get("helm.sh/hook") == "test"]
    if not tests:
        problems.append("no helm test pod")
    problems += tls_problems(by_kind, values)
    return problems


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chart", default=str(HERE.parent.parent / "helm" / "trellis"))
    ap.add_argument("--kube-version", default="1.31.0")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    args = ap.parse_args()

    import helm_sdkpy as helm
    import kubernetes_validate as kv
    from fake_kube_api import FakeKubeAPI

    chart = Path(args.chart)
    work = Path(args.work or tempfile.mkdtemp(prefix="trellis-helm-"))
    for d in ("cache", "config", "data"):
        (work / d).mkdir(parents=True, exist_ok=True)
        os.environ[f"HELM_{d.upper()}_HOME"] = str(work / d)
    defaults = yaml.safe_load((chart / "values.yaml").read_text())

    cases = [("default values", {})]
    for f in sorted((chart / "ci").glob("*-values.yaml")):
        cases.append((f"ci/{f.name}", yaml.safe_load(f.read_text()) or {}))
    negative = [
        ("misspelt-key-values.yaml", {}, ["replcias"]),
        ("misspelt-nested-key-values.yaml", {}, ["enbled"]),
        ("both-etcd-values.yaml", {}, ["oneOf", "etcd"]),
        ("both-etcd-values.yaml", {"skip_schema_validation": True}, ["exactly one of etcd.bundled.enabled=true or etcd.external.endpoints, not both"]),
        ("no-etcd-values.yaml", {}, ["etcd"]),
        ("no-etcd-values.yaml", {"skip_schema_validation": True}, ["none is set"]),
        ("both-tls-values.yaml", {}, ["tls"]),
        ("both-tls-values.yaml", {"skip_schema_validation": True}, ["set tls.existingSecret or tls.certManager.enabled=true, not both"]),
        ("cert-manager-no-issuer-values.yaml", {}, ["issuerRef"]),
        ("cert-manager-no-issuer-values.yaml", {"skip_schema_validation": True}, ["needs tls.certManager.issuerRef.name"]),
    ]

    with FakeKubeAPI() as api:
        kubeconfig = work / "kubeconfig.yaml"
        kubeconfig.write_text(api.kubeconfig())
        for i, (name, overlay) in enumerate(cases):
            values = coalesce(defaults, overlay)
            ns = f"case{i}"
            cfg = helm.Configuration(namespace=ns, kubeconfig=str(kubeconfig))
            # lint, with the merged values as the chart's values.yaml
            lint_chart = work / f"lint{i}" / "trellis"
            shutil.rmtree(lint_chart.parent, ignore_errors=True)
            shutil.copytree(chart, lint_chart)
            (lint_chart / "values.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
            try:
                res = asyncio.run(helm.Lint(cfg).run(str(lint_chart)))
                msgs = res.get("Messages") or []
                errors = [m for m in msgs if m.get("Severity", 0) >= 3]
                warnings = [m for m in msgs if m.get("Severity") == 2]
                detail = f"{len(errors)} errors, {len(warnings)} warnings"
                if errors or warnings:
                    detail += ": " + "; ".join(f"{m.get('Path')}: {json.dumps(m.get('Err'))}" for m in errors + warnings)
                report(not errors and res.get("TotalChartsLinted") == 1, f"helm lint ({name})", detail)
            except Exception as e:  # noqa: BLE001
                report(False, f"helm lint ({name})", str(e).splitlines()[0])
            # install (render + schema + hooks) into the fake API
            try:
                asyncio.run(helm.Install(cfg).run("trellis", str(chart), values=overlay or None, wait=False, timeout=60))
                rel = api.releases(ns, "trellis")[-1]
                objs = split_docs(rel["manifest"]) + [d for h in rel.get("hooks") or [] for d in split_docs(h["manifest"])]
                status = rel["info"]["status"]
                report(status == "deployed", f"helm install into fake API ({name})",
                       f"release {status}, {len(objs)} objects: " + ", ".join(sorted({o['kind'] for o in objs})))
            except Exception as e:  # noqa: BLE001
                report(False, f"helm install ({name})", " ".join(str(e).split())[:600])
                continue
            # kubernetes-validate, strict
            bad, skipped = [], []
            for o in objs:
                try:
                    kv.validate(o, args.kube_version, strict=True)
                except kv.SchemaNotFoundError:
                    skipped.append(o["kind"])
                except kv.ValidationError as e:
                    path = "/".join(str(p) for p in e.path)
                    bad.append(f"{o['kind']}/{o['metadata']['name']} at {path}: {e.message[:200]}")
            detail = f"{len(objs) - len(skipped)} objects valid for Kubernetes {args.kube_version}"
            if skipped:
                detail += f"; no schema offline for {', '.join(sorted(set(skipped)))} (CRDs)"
            report(not bad, f"kubernetes-validate ({name})", "; ".join(bad) if bad else detail)
            problems = policy_problems(objs, values)
            report(not problems, f"chart policies ({name})", "; ".join(problems) if problems else
                   "non-root, read-only root fs, requests, probes, GPU requests and placement, job spec, headless service, dashboards, helm test, "
                   "TLS flags and files, NetworkPolicy ports")
            # the PrometheusRule must carry the alert groups (checked by promtool elsewhere)
            for o in objs:
                if o["kind"] == "PrometheusRule":
                    (work / f"promrule{i}.yml").write_text(yaml.safe_dump(o["spec"]))
        for j, (fname, opts, needles) in enumerate(negative):
            overlay = yaml.safe_load((HERE / "negative" / fname).read_text())
            ns = f"neg{j}"
            cfg = helm.Configuration(namespace=ns, kubeconfig=str(kubeconfig))
            label = f"helm install refuses negative/{fname}" + (" (schema skipped: template check)" if opts else "")
            try:
                asyncio.run(helm.Install(cfg).run("trellis", str(chart), values=overlay, wait=False, timeout=60, **opts))
                report(False, label, "install succeeded")
            except Exception as e:  # noqa: BLE001
                msg = " ".join(str(e).split())
                missing = [n for n in needles if n not in msg]
                report(not missing, label, (f"message lacks {missing}: " if missing else "") + msg[:300])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
