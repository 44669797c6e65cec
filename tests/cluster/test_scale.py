"""The operator's work queue, caches and backoff against the real API server (issue 17).

- a burst of 50 pod events of one ModelDeployment is a handful of reconciles, not 50;
- an API server that answers 429 (an admission webhook on loopback that throttles the operator's
  creates, with Retry-After) is waited on, at least as long as it asks, and the ModelDeployment then
  converges;
- a ResourceQuota that forbids the operator's Service gives a False condition quoting the quota; one
  that forbids pods gives a False condition quoting the quota message the Deployment reports.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.server
import ipaddress
import json
import re
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from .conftest import wait_for
from .operator_proc import OperatorProcess
from .test_operator import apply, condition, md, running, wait_md

RECONCILE_LINE = re.compile(r"reconcile (\S+)/(\S+) \((\w+)\)")


@pytest.fixture(scope="module")
def operator(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    # a long resync, so that only events make reconciles (the count of the burst test is exact)
    env = {"BERTH_RESYNC_SECONDS": "600", "BERTH_BACKOFF_BASE_SECONDS": "0.5"}
    with OperatorProcess.running(cluster, tmp_path_factory.mktemp("operator-scale"), env) as op:
        yield op


def reconciles(op: OperatorProcess, ns: str, name: str) -> int:
    """Reconciles of one ModelDeployment so far, from the operator's (debug) log."""
    text = op.log_path.read_text(errors="replace")
    return sum(1 for m in RECONCILE_LINE.finditer(text) if m.group(1) == ns and m.group(2) == name)


def test_a_burst_of_50_pod_events_is_a_handful_of_reconciles(
    cluster: Any, operator: OperatorProcess, namespace: str
) -> None:
    from kubernetes import client as k8s

    apply(cluster, namespace, md("burst", capacity=1))
    wait_md(cluster, operator, namespace, "burst", running(1), "Running")
    time.sleep(3)  # the last status write's and the pods' own events
    pods = json.loads(
        cluster.kubectl(
            "get", "pods", "-n", namespace, "-l", "berth.dev/model-deployment=burst", "-o", "json", check=True
        ).stdout
    )["items"]
    assert len(pods) == 1
    pod = pods[0]["metadata"]["name"]
    before = reconciles(operator, namespace, "burst")
    core = k8s.CoreV1Api(cluster.api_client())
    started = time.monotonic()
    with ThreadPoolExecutor(10) as pool:  # 50 MODIFIED events of the pod, as fast as the API takes them
        list(
            pool.map(
                lambda i: core.patch_namespaced_pod(
                    pod, namespace, {"metadata": {"annotations": {f"test/burst-{i}": "x"}}}
                ),
                range(50),
            )
        )
    took = time.monotonic() - started
    time.sleep(4)  # the queue's delay for child events (1 s) and the reconcile itself
    after = reconciles(operator, namespace, "burst")
    made = after - before
    assert 1 <= made <= 5, f"{made} reconciles for a burst of 50 pod events in {took:.1f}s"
    got = wait_md(cluster, operator, namespace, "burst", running(1), "still Running")
    assert got["status"]["readyCapacity"] == 1


# ---------------------------------------------------------------- 429 from an admission webhook


def _tls(tmp: Path) -> tuple[Path, Path, bytes]:
    """A CA and a serving certificate for 127.0.0.1: (cert file, key file, CA bundle PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "throttle-webhook-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_file, key_file = tmp / "webhook.crt", tmp / "webhook.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_file, key_file, ca.public_bytes(serialization.Encoding.PEM)


class ThrottlingWebhook:
    """A validating admission webhook on loopback that answers the first `deny` creates by `user` with
    429 and Retry-After `retry_after` (status.details.retryAfterSeconds: the API server sends it on as
    the Retry-After header); records when each one came."""

    def __init__(self, tmp: Path, user: str, deny: int, retry_after: int) -> None:
        self.user, self.deny, self.retry_after = user, deny, retry_after
        self.denied: list[float] = []
        self.allowed: list[float] = []
        cert, key, self.ca = _tls(tmp)
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                req = review["request"]
                response: dict[str, Any] = {"uid": req["uid"], "allowed": True}
                if req["userInfo"]["username"] == hook.user and len(hook.denied) < hook.deny:
                    hook.denied.append(time.monotonic())
                    response = {
                        "uid": req["uid"],
                        "allowed": False,
                        "status": {
                            "code": 429,
                            "reason": "TooManyRequests",
                            "message": "the test webhook throttles the operator",
                            "details": {"retryAfterSeconds": hook.retry_after},
                        },
                    }
                elif req["userInfo"]["username"] == hook.user:
                    hook.allowed.append(time.monotonic())
                body = json.dumps(
                    {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def configuration(self, name: str, namespace: str) -> dict[str, Any]:
        return {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": name},
            "webhooks": [
                {
                    "name": "throttle.test.berth.dev",
                    "clientConfig": {
                        "url": f"https://127.0.0.1:{self.port}/validate",
                        "caBundle": base64.b64encode(self.ca).decode(),
                    },
                    "rules": [
                        {
                            "apiGroups": ["apps"],
                            "apiVersions": ["v1"],
                            "operations": ["CREATE"],
                            "resources": ["deployments"],
                        }
                    ],
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                    "failurePolicy": "Fail",
                    "sideEffects": "None",
                    "admissionReviewVersions": ["v1"],
                    "timeoutSeconds": 5,
                }
            ],
        }

    def stop(self) -> None:
        self.server.shutdown()


def test_a_429_is_waited_on_as_long_as_asked_and_then_converges(
    cluster: Any, operator: OperatorProcess, namespace: str, tmp_path: Path
) -> None:
    hook = ThrottlingWebhook(tmp_path, operator.user, deny=3, retry_after=2)
    name = f"throttle-{namespace[-6:]}"
    r = cluster.kubectl("apply", "-f", "-", input=json.dumps(hook.configuration(name, namespace)))
    assert r.returncode == 0, r.stderr
    try:
        time.sleep(2)  # the API server picks the webhook up
        apply(cluster, namespace, md("throttled", capacity=1))
        wait_md(cluster, operator, namespace, "throttled", running(1), "Running after the 429s", timeout=90)
        assert len(hook.denied) == 3, hook.denied
        gaps = [b - a for a, b in zip(hook.denied, [*hook.denied[1:], hook.allowed[0]], strict=True)]
        assert all(g >= 1.9 for g in gaps), f"retries came sooner than Retry-After 2 s: {gaps}"
        log = operator.log_path.read_text(errors="replace")
        assert "asks to slow down" in log and "throttles the operator" in log
        got = wait_md(cluster, operator, namespace, "throttled", running(1), "Running")
        assert condition(got["status"], "Ready")["status"] == "True"
    finally:
        cluster.kubectl("delete", "validatingwebhookconfiguration", name, "--ignore-not-found")
        hook.stop()


# ---------------------------------------------------------------- 403 from a ResourceQuota


def _quota(cluster: Any, namespace: str, hard: dict[str, str]) -> None:
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "tight", "namespace": namespace},
        "spec": {"hard": hard},
    }
    r = cluster.kubectl("apply", "-f", "-", input=json.dumps(quota))
    assert r.returncode == 0, r.stderr
    wait_for(  # the quota controller has computed its usage: admission enforces it from now on
        lambda: (
            json.loads(
                cluster.kubectl(
                    "get", "resourcequota", "tight", "-n", namespace, "-o", "json", check=True
                ).stdout
            )
            .get("status", {})
            .get("hard")
        ),
        timeout=60,
        message="the ResourceQuota's status",
    )


def test_a_quota_that_forbids_the_service_is_a_false_condition_quoting_it(
    cluster: Any, operator: OperatorProcess, namespace: str
) -> None:
    _quota(cluster, namespace, {"services": "0"})
    apply(cluster, namespace, md("quota", capacity=1))
    got = wait_md(
        cluster,
        operator,
        namespace,
        "quota",
        lambda s: condition(s, "Ready").get("reason") == "Forbidden",
        "Ready False Forbidden",
    )
    ready = condition(got["status"], "Ready")
    assert ready["status"] == "False" and got["status"]["phase"] == "Failed"
    assert "exceeded quota: tight" in ready["message"] and "services" in ready["message"]
    events = json.loads(
        cluster.kubectl(
            "get", "events", "-n", namespace, "--field-selector", "involvedObject.name=quota", "-o", "json"
        ).stdout
    )["items"]
    forbidden = [e for e in events if e["reason"] == "Forbidden"]
    assert len(forbidden) == 1 and "exceeded quota" in forbidden[0]["message"]  # once, not per retry
    cluster.kubectl("delete", "resourcequota", "tight", "-n", namespace, check=True)
    wait_md(cluster, operator, namespace, "quota", running(1), "Running once the quota is gone", timeout=90)


def test_a_quota_that_forbids_pods_is_a_false_condition_quoting_it(
    cluster: Any, operator: OperatorProcess, namespace: str
) -> None:
    _quota(cluster, namespace, {"pods": "0"})
    apply(cluster, namespace, md("nopods", capacity=1))
    got = wait_md(
        cluster,
        operator,
        namespace,
        "nopods",
        lambda s: "exceeded quota" in condition(s, "Ready").get("message", ""),
        "Ready False quoting the quota",
        timeout=90,
    )
    ready = condition(got["status"], "Ready")
    assert ready["status"] == "False" and ready["reason"] == "FailedCreate", ready
    assert "exceeded quota: tight" in ready["message"] and "pods" in ready["message"]
