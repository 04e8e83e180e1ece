"""A small local Kubernetes API for the eval backend's tests: the endpoints the official client
calls (Jobs create with and without dryRun, read, status, list by label; pods list), with the API
server's validation of what matters in an eval Job (422), 409 on an existing name, and errors a
test can queue per HTTP method."""
from __future__ import annotations

import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def invalid(body: dict) -> str | None:
    """What the API server (with its admission) would refuse in an eval Job; None if valid."""
    try:
        name = body["metadata"]["name"]
        spec, pod = body["spec"], body["spec"]["template"]["spec"]
        command = pod["containers"][0]["command"]
    except (KeyError, IndexError, TypeError) as e:
        return f"missing {e}"
    checks = {
        "apiVersion": body.get("apiVersion") == "batch/v1", "kind": body.get("kind") == "Job",
        "metadata.name": isinstance(name, str) and len(name) <= 63 and bool(DNS1123.match(name)),
        "command": isinstance(command, list) and all(isinstance(a, str) for a in command),
        "restartPolicy": pod.get("restartPolicy") == "Never",
        "activeDeadlineSeconds": type(spec.get("activeDeadlineSeconds")) is int,
        "automountServiceAccountToken": pod.get("automountServiceAccountToken") is False,
    }
    bad = [k for k, ok in checks.items() if not ok]
    return ", ".join(bad) if bad else None


class _API(BaseHTTPRequestHandler):
    state: dict  # set per server (see _serve)

    def _send(self, code: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _status(self, code: int, message: str, reason: str = "") -> None:
        self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason, "code": code})

    def _injected(self) -> bool:
        """The test queued an error for this method: answer it instead."""
        queue = self.state["fail"].get(self.command, [])
        if queue:
            code = queue.pop(0)
            self._status(code, f"injected {code}", "Forbidden" if code == 403 else "InternalError")
            return True
        return False

    def do_POST(self):  # noqa: N802
        url = urlparse(self.path)
        query = parse_qs(url.query)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.state["lock"]:
            self.state["requests"].append(("POST", self.path))
            if self._injected():
                return
            m = re.fullmatch(r"/apis/batch/v1/namespaces/([^/]+)/jobs", url.path)
            if not m:
                return self._status(404, f"no route {url.path}", "NotFound")
            if (why := invalid(body)) is not None:
                return self._status(422, f"Job is invalid: {why}", "Invalid")
            jobs = self.state["jobs"]
            name = body["metadata"]["name"]
            if name in jobs:
                return self._status(409, f'jobs.batch "{name}" already exists', "AlreadyExists")
            body["metadata"]["namespace"] = m[1]
            if query.get("dryRun") != ["All"]:
                jobs[name] = {**body, "status": {"active": 1}}
            self._send(201, body)

    def do_GET(self):  # noqa: N802
        url = urlparse(self.path)
        selector = dict(kv.split("=", 1) for kv in parse_qs(url.query).get("labelSelector", [""])[0].split(",") if kv)
        with self.state["lock"]:
            self.state["requests"].append(("GET", self.path))
            if self._injected():
                return
            jobs = self.state["jobs"]
            if m := re.fullmatch(r"/apis/batch/v1/namespaces/([^/]+)/jobs/([^/]+?)(/status)?", url.path):
                if m[2] not in jobs:
                    return self._status(404, f'jobs.batch "{m[2]}" not found', "NotFound")
                return self._send(200, jobs[m[2]])
            if re.fullmatch(r"/apis/batch/v1/namespaces/([^/]+)/jobs", url.path):
                items = [j for j in jobs.values() if all(j["metadata"]["labels"].get(k) == v for k, v in selector.items())]
                return self._send(200, {"kind": "JobList", "apiVersion": "batch/v1", "metadata": {}, "items": items})
            if re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods", url.path):
                items = self.state["pods"].get(selector.get("job-name"), [])
                return self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
            self._status(404, f"no route {url.path}", "NotFound")

    def log_message(self, *args):
        pass


class _V6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def serve(host: str):
    state = {"jobs": {}, "pods": {}, "fail": {}, "requests": [], "lock": threading.Lock()}
    handler = type("Handler", (_API,), {"state": state})
    server = (_V6Server if ":" in host else ThreadingHTTPServer)((host, 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    state["url"] = f"http://[{host}]:{server.server_port}" if ":" in host else f"http://{host}:{server.server_port}"
    return server, state
