"""Client pods: a Python process in its own pod (the operator image: Python + httpx) that calls a
Berth endpoint from inside the cluster and prints one `RESULT {json}` line."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import pytest

from .conftest import OPERATOR_NS, get_or_none, kjson, wait_for

GATEWAY = f"http://berth-gateway.{OPERATOR_NS}.svc.cluster.local/v1"  # the chart's gateway Service

SCRIPT = r"""
import json, os
import httpx

base = os.environ["ENDPOINT"].rstrip("/")
headers = {"Authorization": "Bearer " + os.environ["API_KEY"]}
body = {
    "model": os.environ["MODEL"],
    "messages": [{"role": "user", "content": os.environ["PROMPT"]}],
    "max_tokens": int(os.environ["MAX_TOKENS"]),
    "temperature": 0,
}
if os.environ.get("IGNORE_EOS") == "1":
    body["ignore_eos"] = True
timeout = httpx.Timeout(float(os.environ["READ_TIMEOUT"]), connect=float(os.environ["CONNECT_TIMEOUT"]))
out = {}
try:
    if os.environ["MODE"] == "chat":
        r = httpx.post(base + "/chat/completions", json=body, headers=headers, timeout=timeout)
        out = {"status": r.status_code, "body": r.json()}
    else:
        body["stream"] = True
        chunks, text, finish, done = 0, "", None, False
        with httpx.stream("POST", base + "/chat/completions", json=body, headers=headers, timeout=timeout) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    out["error_event"] = event
                    continue
                for choice in event.get("choices", []):
                    text += (choice.get("delta") or {}).get("content") or ""
                    finish = choice.get("finish_reason") or finish
                chunks += 1
                if chunks == 1:
                    print("FIRST-CHUNK", flush=True)
        out.update(chunks=chunks, text=text, finish_reason=finish, done=done)
except httpx.ConnectTimeout as e:
    out = {"error": "ConnectTimeout", "detail": str(e)}
except Exception as e:
    out = {"error": type(e).__name__, "detail": str(e)}
print("RESULT " + json.dumps(out), flush=True)
"""


def client_pod(
    name: str,
    image: str,
    endpoint: str,
    model: str,
    key_secret: str,
    mode: str = "chat",
    prompt: str = "What is the capital of France?",
    max_tokens: int = 20,
    ignore_eos: bool = False,
    connect_timeout: float = 10,
    read_timeout: float = 180,
) -> dict[str, Any]:
    env = {
        "ENDPOINT": endpoint,
        "MODEL": model,
        "MODE": mode,
        "PROMPT": prompt,
        "MAX_TOKENS": str(max_tokens),
        "IGNORE_EOS": "1" if ignore_eos else "0",
        "CONNECT_TIMEOUT": str(connect_timeout),
        "READ_TIMEOUT": str(read_timeout),
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "berth-test-client"}},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 1000,
                "runAsGroup": 1000,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "client",
                    "image": image,
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["python", "-c", SCRIPT],
                    "env": [
                        *({"name": k, "value": v} for k, v in env.items()),
                        {
                            "name": "API_KEY",
                            "valueFrom": {"secretKeyRef": {"name": key_secret, "key": "key"}},
                        },
                    ],
                    "resources": {
                        "requests": {"cpu": "50m", "memory": "64Mi"},
                        "limits": {"memory": "256Mi"},
                    },
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }


def put_key(cluster: Any, namespace: str, key: str) -> str:
    """A Secret `client-key` (entry `key`) in the client's namespace: clients get the key, not the instance's Secret."""
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "client-key"},
        "type": "Opaque",
        "stringData": {"key": key},
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(secret), check=True)
    return "client-key"


def start_client(
    cluster: Any, namespace: str, image: str, endpoint: str, model: str, key: str, **kw: Any
) -> str:
    name = f"client-{uuid.uuid4().hex[:6]}"
    secret = put_key(cluster, namespace, key)
    pod = client_pod(name, image, endpoint, model, secret, **kw)
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pod), check=True)
    return name


def logs(cluster: Any, namespace: str, pod: str) -> str:
    return str(cluster.kubectl("logs", "-n", namespace, pod).stdout)


def result(cluster: Any, namespace: str, pod: str, timeout: float = 240) -> dict[str, Any]:
    """Wait for the client pod to finish; its RESULT line, parsed."""

    def finished() -> str | None:
        p = get_or_none(cluster, "get", "pod", pod, "-n", namespace)
        phase = ((p or {}).get("status") or {}).get("phase")
        return phase if phase in ("Succeeded", "Failed") else None

    phase = wait_for(finished, timeout, f"client pod {namespace}/{pod} to finish", interval=1)
    out = logs(cluster, namespace, pod)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if phase != "Succeeded" or not lines:
        pytest.fail(f"client pod {pod} {phase}, output:\n{out[-3000:]}")
    return dict(json.loads(lines[-1][len("RESULT ") :]))


def call(
    cluster: Any, namespace: str, image: str, endpoint: str, model: str, key: str, **kw: Any
) -> dict[str, Any]:
    return result(cluster, namespace, start_client(cluster, namespace, image, endpoint, model, key, **kw))


def apikey(cluster: Any, namespace: str, name: str, models: list[str]) -> str:
    """An ApiKey (a team key for the gateway) in `namespace`; its key, once the operator made it."""
    body = {
        "apiVersion": "berth.dev/v1alpha1",
        "kind": "ApiKey",
        "metadata": {"name": name},
        "spec": {"models": models},
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(body), check=True)

    def made() -> dict[str, Any] | None:
        status = (get_or_none(cluster, "get", "apikey", name, "-n", namespace) or {}).get("status") or {}
        return status if status.get("keyHash") and status.get("secretName") else None

    status = wait_for(made, 60, f"ApiKey {namespace}/{name}'s hash in its status")
    secret = kjson(cluster, "get", "secret", status["secretName"], "-n", namespace)
    return base64.b64decode(secret["data"]["key"]).decode()
