"""Small structural checks of deployment files that no external tool covers.
Prints one line per check; exits 1 on any failure."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "trellis"
failures = 0


def report(ok: bool, name: str, detail: str = "") -> None:
    global failures
    failures += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {name}" + (f" — {detail}" if detail else ""), flush=True)


def schema_strict(node, path="$") -> list[str]:
    """Every object schema must close its keys: additionalProperties false (fixed keys), a
    schema for additional values (maps such as labels), or a $comment naming it a Kubernetes
    pass-through type (validated against the Kubernetes schema after rendering)."""
    bad = []
    if isinstance(node, dict):
        if node.get("type") == "object" or "properties" in node:
            # a branch or condition of a schema constrains keys another level defines
            is_branch = bool({"oneOf", "anyOf", "allOf", "not", "if", "then", "else"} & set(path.split("/")))
            if not is_branch:
                ap = node.get("additionalProperties", None)
                if ap is None and "$comment" not in node:
                    bad.append(path)
                elif ap is True:
                    bad.append(path)
        for k, v in node.items():
            bad += schema_strict(v, f"{path}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            bad += schema_strict(v, f"{path}/{i}")
    return bad


def main() -> int:
    schema = json.loads((CHART / "values.schema.json").read_text())
    bad = schema_strict(schema)
    report(not bad, "values.schema.json closes every object (additionalProperties: false)",
           ", ".join(bad) if bad else "every object level rejects unknown keys")

    # every key of values.yaml is described by the schema (and so documented)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = []

    def walk(v, s, path):
        if not isinstance(v, dict) or not isinstance(s, dict):
            return
        props = s.get("properties")
        if props is None:
            return
        for k, sub in v.items():
            if k not in props:
                missing.append(f"{path}.{k}")
            else:
                walk(sub, props[k], f"{path}.{k}")
    walk(values, schema, "values")
    report(not missing, "every values.yaml key is in values.schema.json", ", ".join(missing))

    # the job spec of each values file parses as TOML and matches the workers it will get
    import copy
    import tomllib

    def merge(a, b):
        if not isinstance(a, dict) or not isinstance(b, dict):
            return copy.deepcopy(b)
        out = copy.deepcopy(a)
        for k, v in b.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = merge(out.get(k), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
        return out
    cases = [("values.yaml", values)] + [(f"ci/{f.name}", merge(values, yaml.safe_load(f.read_text()) or {}))
                                        for f in sorted((CHART / "ci").glob("*-values.yaml"))]
    for name, v in cases:
        try:
            spec = tomllib.loads(v["job"]["spec"])
        except tomllib.TOMLDecodeError as e:
            report(False, f"job spec of {name} is TOML", str(e))
            continue
        par = spec.get("parallel", {})
        ranks = par.get("dp", 1) * par.get("tp", 1)
        problems = []
        if ranks != v["worker"]["replicas"]:
            problems.append(f"parallel.dp x tp = {ranks} but worker.replicas = {v['worker']['replicas']}")
        dev = spec.get("train", {}).get("device", "cpu")
        if dev.split(":")[0] != v["worker"]["device"].split(":")[0]:
            problems.append(f"train.device {dev!r} but worker.device {v['worker']['device']!r}")
        mount = v["persistence"]["mountPath"].rstrip("/") + "/"
        for key in ("train", "valid", "tokenizer", "cache_dir"):
            path = spec.get("data", {}).get(key)
            if path and not path.startswith(mount):
                problems.append(f"data.{key} {path!r} is not on the shared volume ({mount})")
        ck = spec.get("checkpoint", {}).get("dir")
        if not ck or not ck.startswith(mount):
            problems.append(f"checkpoint.dir {ck!r} is not on the shared volume ({mount})")
        report(not problems, f"job spec of {name} fits the chart", "; ".join(problems) or
               f"{ranks} ranks = worker.replicas, device {dev}, paths under {mount}")

    # every GPU job spec of deploy/jobs/ has a values file, ci/job-<name>-values.yaml, whose spec
    # is that file with only its paths moved onto the shared volume (data.train / valid /
    # tokenizer / cache_dir, checkpoint.dir): the chart cannot read deploy/, so this ties them
    def without_paths(spec: dict) -> dict:
        spec = copy.deepcopy(spec)
        for key in ("train", "valid", "tokenizer", "cache_dir"):
            spec.get("data", {}).pop(key, None)
        spec.get("checkpoint", {}).pop("dir", None)
        return spec
    def differences(a, b, path="") -> list[str]:
        if isinstance(a, dict) and isinstance(b, dict):
            return [d for k in sorted(set(a) | set(b)) for d in differences(a.get(k), b.get(k), f"{path}.{k}".lstrip("."))]
        return [] if a == b else [path]
    gpu_specs = []
    for f in sorted((ROOT / "deploy/jobs").glob("*.toml")):
        spec = tomllib.loads(f.read_text())
        if spec.get("train", {}).get("device", "cpu").startswith("cuda"):
            gpu_specs.append((f, spec))
    for f, spec in gpu_specs:
        vf = CHART / "ci" / f"job-{f.stem}-values.yaml"
        if not vf.exists():
            report(False, f"deploy/jobs/{f.name} has a Helm values file", f"missing {vf.relative_to(ROOT)}")
            continue
        v = merge(values, yaml.safe_load(vf.read_text()) or {})
        chart_spec = tomllib.loads(v["job"]["spec"])
        a, b = without_paths(spec), without_paths(chart_spec)
        diff = differences(a, b)
        gpu = v["worker"]["gpuResourceName"]
        problems = []
        if diff:
            problems.append(f"differs from deploy/jobs/{f.name} in {', '.join(diff)}")
        if not v["worker"]["device"].startswith("cuda") or v["worker"]["gpusPerWorker"] != 1:
            problems.append(f"worker.device {v['worker']['device']!r}, gpusPerWorker {v['worker']['gpusPerWorker']}: one {gpu} per cuda worker expected")
        if not v["worker"]["nodeSelector"] or not v["worker"]["tolerations"]:
            problems.append("no GPU nodeSelector / tolerations")
        report(not problems, f"ci/{vf.name} is deploy/jobs/{f.name} on the chart", "; ".join(problems) or
               f"same spec but paths, {v['worker']['replicas']} cuda workers x 1 {gpu}, nodeSelector + tolerations")
    report(len(gpu_specs) >= 2, "deploy/jobs/ has GPU job specs", ", ".join(f.name for f, _ in gpu_specs))

    # the chart ships copies of deploy/ files (a chart cannot read outside its directory)
    pairs = [(ROOT / "deploy/prometheus/alerts.yml", CHART / "files/alerts.yml")]
    src = sorted((ROOT / "deploy/grafana/dashboards").glob("*.json"))
    dst = sorted((CHART / "files/dashboards").glob("*.json"))
    pairs += [(f, CHART / "files/dashboards" / f.name) for f in src]
    extra = sorted({f.name for f in dst} - {f.name for f in src})
    diff = [str(b.relative_to(ROOT)) for a, b in pairs if not b.exists() or a.read_bytes() != b.read_bytes()]
    report(not diff and not extra, "helm/trellis/files/ matches deploy/ (alerts, dashboards)",
           ("differ: " + ", ".join(diff) if diff else "") + (" extra: " + ", ".join(extra) if extra else "") +
           ("" if not diff and not extra else " — run: cp deploy/prometheus/alerts.yml helm/trellis/files/ && cp deploy/grafana/dashboards/*.json helm/trellis/files/dashboards/"))

    # every alert has at least one promtool test in which it fires, and one where it does not
    alerts = [r["alert"] for g in yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())["groups"]
              for r in g["rules"] if "alert" in r]
    tests = yaml.safe_load((ROOT / "deploy/prometheus/alerts_test.yml").read_text())["tests"]
    fires, quiet = set(), set()
    for t in tests:
        for a in t.get("alert_rule_test", []):
            (fires if a.get("exp_alerts") else quiet).add(a["alertname"])
    no_fire = [a for a in alerts if a not in fires]
    no_quiet = [a for a in alerts if a not in quiet]
    report(not no_fire and not no_quiet, f"every alert ({len(alerts)}) has a firing and a quiet test",
           (f"never fires in a test: {no_fire} " if no_fire else "") + (f"never quiet in a test: {no_quiet}" if no_quiet else ""))
    # every alert has a runbook section in docs/operations.md
    ops = (ROOT / "docs/operations.md")
    text = ops.read_text() if ops.exists() else ""
    heads = {re.sub(r"[^a-z0-9]", "", h.lower()) for h in re.findall(r"^#+\s+(.*)$", text, re.M)}
    no_doc = [a for a in alerts if a.lower() not in heads]
    report(ops.exists() and not no_doc, "every alert has a section in docs/operations.md",
           f"missing: {', '.join(no_doc)}" if no_doc else "")

    # Grafana provisioning files parse and point at the dashboards
    prov = ROOT / "deploy/grafana/provisioning"
    problems = []
    for f in sorted(prov.rglob("*.yaml")):
        doc = yaml.safe_load(f.read_text())
        if doc.get("apiVersion") != 1:
            problems.append(f"{f.name}: apiVersion is not 1")
        if "datasources" not in doc and "providers" not in doc:
            problems.append(f"{f.name}: neither datasources nor providers")
        for ds in doc.get("datasources", []):
            if ds.get("type") != "prometheus":
                problems.append(f"{f.name}: data source {ds.get('name')} is not prometheus")
    report(not problems and any(prov.rglob("*.yaml")), "Grafana provisioning files", "; ".join(problems))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
