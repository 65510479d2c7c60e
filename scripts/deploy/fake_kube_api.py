"""A tiny in-memory Kubernetes API server on loopback, just enough for Helm's install action.

Helm (through helm-sdkpy, the real Helm v4 Go library) needs a cluster to install into; none is
reachable here. This server answers discovery (/version, /api, /apis, resource lists), stores
what is created (JSON from the dynamic client, protobuf Secrets from Helm's release storage
driver) and lists it back. It renders nothing: every manifest it sees was rendered by Helm.
Jobs are reported complete so that Helm's status checks never wait.
"""
from __future__ import annotations

import base64
import gzip
import json
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

KUBE_VERSION = {"major": "1", "minor": "31", "gitVersion": "v1.31.0", "platform": "linux/amd64"}

# (group, version) -> [(plural, Kind, namespaced)]
RESOURCES = {
    ("", "v1"): [
        ("configmaps", "ConfigMap", True), ("secrets", "Secret", True), ("services", "Service", True),
        ("pods", "Pod", True), ("persistentvolumeclaims", "PersistentVolumeClaim", True),
        ("serviceaccounts", "ServiceAccount", True), ("namespaces", "Namespace", False),
        ("events", "Event", True),
    ],
    ("apps", "v1"): [("deployments", "Deployment", True), ("statefulsets", "StatefulSet", True)],
    ("batch", "v1"): [("jobs", "Job", True)],
    ("policy", "v1"): [("poddisruptionbudgets", "PodDisruptionBudget", True)],
    ("networking.k8s.io", "v1"): [("networkpolicies", "NetworkPolicy", True)],
    ("monitoring.coreos.com", "v1"): [
        ("servicemonitors", "ServiceMonitor", True), ("prometheusrules", "PrometheusRule", True),
    ],
    ("cert-manager.io", "v1"): [("certificates", "Certificate", True)],
}

PATH = re.compile(
    r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
    r"(?:/namespaces/(?P<ns>[^/]+))?(?:/(?P<res>[^/]+))?(?:/(?P<name>[^/]+))?$"
)


def _pb_fields(buf: bytes) -> dict[int, list]:
    """Decode one protobuf message into {field: [values]} (varint or length-delimited)."""
    out: dict[int, list] = {}
    i = 0

    def varint() -> int:
        nonlocal i
        result = shift = 0
        while True:
            b = buf[i]
            i += 1
            result |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return result

    while i < len(buf):
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
        elif wire == 2:
            n = varint()
            value = buf[i:i + n]
            i += n
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.setdefault(field, []).append(value)
    return out


def _pb_map(entries: list, as_base64: bool = False) -> dict[str, str]:
    d = {}
    for entry in entries:
        f = _pb_fields(entry)
        key = f.get(1, [b""])[0].decode()
        value = f.get(2, [b""])[0]
        d[key] = base64.b64encode(value).decode() if as_base64 else value.decode()
    return d


def secret_from_protobuf(body: bytes) -> dict:
    """k8s.io/api core/v1 Secret in the 'k8s\\0' protobuf envelope -> JSON form."""
    if body[:4] != b"k8s\x00":
        raise ValueError("not a Kubernetes protobuf envelope")
    unknown = _pb_fields(body[4:])
    secret = _pb_fields(unknown[2][0])
    meta = _pb_fields(secret[1][0])
    obj = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": meta[1][0].decode(),
            "labels": _pb_map(meta.get(11, [])),
            "annotations": _pb_map(meta.get(12, [])),
        },
        "data": _pb_map(secret.get(2, []), as_base64=True),
    }
    if 3 in secret:
        obj["type"] = secret[3][0].decode()
    return obj


class FakeKubeAPI:
    def __init__(self) -> None:
        self.store: dict[tuple, dict[str, dict]] = {}
        self.lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str, message: str) -> None:
                self._send(code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                  "reason": reason, "message": message, "code": code})

            def _body(self) -> dict:
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                if self.headers.get("Content-Type", "").startswith("application/vnd.kubernetes.protobuf"):
                    return secret_from_protobuf(raw)
                return json.loads(raw or b"{}")

            def _handle(self) -> None:
                url = urlparse(self.path)
                query = parse_qs(url.query)
                path = url.path.rstrip("/")
                if path == "/version":
                    return self._send(200, KUBE_VERSION)
                if path == "/api":
                    return self._send(200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                        {"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]})
                if path == "/apis":
                    groups: dict[str, list] = {}
                    for g, v in RESOURCES:
                        if g:
                            groups.setdefault(g, []).append(v)
                    return self._send(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                        {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
                         "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]}}
                        for g, vs in groups.items()]})
                m = PATH.match(path)
                if not m:
                    return self._status(404, "NotFound", f"{path} not served by the fake API")
                group, version = m["group"] or "", m["core"] or m["version"]
                if (group, version) not in RESOURCES:
                    return self._status(404, "NotFound", f"{group}/{version} not served")
                gv = f"{group}/{version}" if group else version
                if not m["res"]:
                    return self._send(200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": [
                        {"name": n, "singularName": "", "namespaced": ns, "kind": k,
                         "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}
                        for n, k, ns in RESOURCES[(group, version)]]})
                kinds = {n: k for n, k, _ in RESOURCES[(group, version)]}
                if m["res"] not in kinds:
                    return self._status(404, "NotFound", f"resource {m['res']} not served")
                key = (gv, m["ns"] or "", m["res"])
                with api.lock:
                    coll = api.store.setdefault(key, {})
                    if self.command == "GET":
                        if m["name"]:
                            obj = coll.get(m["name"])
                            return self._send(200, obj) if obj else self._status(404, "NotFound", f"{m['name']} not found")
                        if query.get("watch", [""])[0] in ("true", "1"):
                            items = None
                        else:
                            items = list(coll.values())
                            for cond in filter(None, query.get("labelSelector", [""])[0].split(",")):
                                k, _, v = cond.partition("=")
                                items = [o for o in items if (o.get("metadata", {}).get("labels") or {}).get(k) == v]
                    elif self.command == "POST":
                        obj = self._body()
                        meta = obj.setdefault("metadata", {})
                        if meta.get("name") in coll:
                            return self._status(409, "AlreadyExists", f"{meta.get('name')} already exists")
                        meta.update(uid=str(uuid.uuid4()), resourceVersion="1", generation=1,
                                    creationTimestamp="2026-01-01T00:00:00Z")
                        if m["ns"]:
                            meta["namespace"] = m["ns"]
                        if obj.get("kind") == "Job":
                            obj["status"] = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
                        coll[meta["name"]] = obj
                        return self._send(201, obj)
                    elif self.command in ("PUT", "PATCH"):
                        if m["name"] not in coll:
                            return self._status(404, "NotFound", f"{m['name']} not found")
                        if self.command == "PUT":
                            coll[m["name"]] = self._body()
                        else:
                            self._body()
                        return self._send(200, coll[m["name"]])
                    elif self.command == "DELETE":
                        coll.pop(m["name"], None)
                        return self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
                    else:
                        return self._status(405, "MethodNotAllowed", self.command)
                if items is None:  # a watch: nothing ever changes here
                    time.sleep(1)
                    return self._send(200, {})
                return self._send(200, {"kind": kinds[m["res"]] + "List", "apiVersion": gv,
                                        "metadata": {"resourceVersion": "1"}, "items": items})

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeKubeAPI":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self, namespace: str = "default") -> str:
        return (
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: fake, cluster: {{server: 'http://127.0.0.1:{self.port}'}}}}]\n"
            "users: [{name: fake, user: {token: fake}}]\n"
            f"contexts: [{{name: fake, context: {{cluster: fake, user: fake, namespace: {namespace}}}}}]\n"
            "current-context: fake\n"
        )

    def releases(self, namespace: str, name: str) -> list[dict]:
        """Helm release records (decoded) stored for release `name`, oldest first."""
        out = []
        with self.lock:
            secrets = list(self.store.get(("v1", namespace, "secrets"), {}).values())
        for s in secrets:
            labels = s.get("metadata", {}).get("labels") or {}
            if labels.get("owner") == "helm" and labels.get("name") == name:
                raw = base64.b64decode(base64.b64decode(s["data"]["release"]))
                out.append(json.loads(gzip.decompress(raw)))
        return sorted(out, key=lambda r: r.get("version", 0))

    def objects(self, namespace: str) -> list[dict]:
        """Objects created through the API in `namespace`, except Helm's release Secrets."""
        with self.lock:
            out = []
            for (gv, ns, res), coll in self.store.items():
                if ns != namespace:
                    continue
                for obj in coll.values():
                    if res == "secrets" and (obj.get("metadata", {}).get("labels") or {}).get("owner") == "helm":
                        continue
                    out.append(obj)
            return out
