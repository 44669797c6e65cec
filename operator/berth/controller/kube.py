"""The few Kubernetes API operations the operator makes, behind one small interface.

`Kube` is what reconcile talks to. `KubeClient` implements it with the official `kubernetes`
client (raw REST calls through its ApiClient, so every kind is handled the same way and bodies
stay plain dicts); unit tests use a recording implementation. 409 on create and 404 on delete are
success here, not errors.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from berth.api.models import GROUP, PLURAL, VERSION
from berth.controller import metrics
from berth.controller.backoff import TokenBucket

log = logging.getLogger(__name__)


JsonPatch = list[dict[str, Any]]  # RFC 6902 operations


@dataclass(frozen=True)
class Kind:
    """A namespaced resource: REST prefix ("api/v1", "apis/apps/v1") and plural."""

    kind: str
    prefix: str
    plural: str


DEPLOYMENT = Kind("Deployment", "apis/apps/v1", "deployments")
SERVICE = Kind("Service", "api/v1", "services")
SECRET = Kind("Secret", "api/v1", "secrets")
NETWORK_POLICY = Kind("NetworkPolicy", "apis/networking.k8s.io/v1", "networkpolicies")
PDB = Kind("PodDisruptionBudget", "apis/policy/v1", "poddisruptionbudgets")
POD = Kind("Pod", "api/v1", "pods")
EVENT = Kind("Event", "api/v1", "events")
MODEL_DEPLOYMENT = Kind("ModelDeployment", f"apis/{GROUP}/{VERSION}", PLURAL)

# The Gateway API Inference Extension's InferencePool, and its API group's discovery document (a GET of
# "apis/inference.networking.k8s.io/v1" itself: 404 when the CRD is not installed).
INFERENCE_POOL = Kind("InferencePool", "apis/inference.networking.k8s.io/v1", "inferencepools")
INFERENCE_POOL_API = Kind("APIResourceList", "apis/inference.networking.k8s.io", "v1")

KOPF_PEERING = Kind("KopfPeering", "apis/kopf.dev/v1", "kopfpeerings")
CLUSTER_KOPF_PEERING = Kind("ClusterKopfPeering", "apis/kopf.dev/v1", "clusterkopfpeerings")

KINDS_BY_NAME = {
    k.kind: k
    for k in (DEPLOYMENT, SERVICE, SECRET, NETWORK_POLICY, PDB, POD, EVENT, MODEL_DEPLOYMENT, INFERENCE_POOL)
}


class ApiError(Exception):
    """A Kubernetes API error with its HTTP status and the server's message.

    `KubeClient` raises the subclass for the statuses callers act on (`for_status` picks it)."""

    def __init__(self, status: int, reason: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after = retry_after  # seconds, from a Retry-After header (429, some 5xx)

    @staticmethod
    def for_status(status: int, reason: str, message: str, retry_after: float | None = None) -> ApiError:
        """The ApiError (subclass) for an HTTP status."""
        return _BY_STATUS.get(status, ApiError)(status, reason, message, retry_after)


# What the API server answers (422) for a JSON Patch that does not apply (k8s.io/apiserver's patch handler)
PATCH_NOT_APPLICABLE = "the server rejected our request due to an error in our request"


class Rejected(ApiError):
    """400 / 422: the API server refused the object (validation, admission)."""

    @property
    def patch_not_applicable(self) -> bool:
        """The refusal of a JSON Patch that does not apply to the object (a `test` op that does not
        hold, a path that is not there): 422 with the API server's generic message and no causes (it
        does not say which op failed), unlike a refusal of the patched object (validation, admission)."""
        return self.status == 422 and self.message == PATCH_NOT_APPLICABLE


class NotFound(ApiError):
    """404: no such object."""


class Conflict(ApiError):
    """409: the object exists already, or a write raced another."""


class Forbidden(ApiError):
    """403: RBAC, a ResourceQuota or an admission plugin forbade the request; the message says which."""


class TooManyRequests(ApiError):
    """429: the API server (priority and fairness, a webhook) asks the client to slow down."""


class Gone(ApiError):
    """410: a watch's resourceVersion is too old; list again."""


_BY_STATUS: dict[int, type[ApiError]] = {
    400: Rejected,
    422: Rejected,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    410: Gone,
    429: TooManyRequests,
}


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header's delay in seconds (the API server sends whole seconds), None if absent."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


class Kube(Protocol):
    def get(self, kind: Kind, namespace: str, name: str) -> dict[str, Any] | None: ...

    def list(self, kind: Kind, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        """Objects of a kind in a namespace ("" = all namespaces), filtered by a label selector ("" = all)."""
        ...

    def create(
        self, kind: Kind, namespace: str, body: dict[str, Any], dry_run: bool = False
    ) -> dict[str, Any] | None:
        """Create; None when it exists already (409). `dry_run`: only ask whether the create would
        succeed (nothing is stored: an existence check that needs `create`, not `get`)."""
        ...

    def patch(self, kind: Kind, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]: ...

    def json_patch(self, kind: Kind, namespace: str, name: str, ops: JsonPatch) -> dict[str, Any]:
        """Apply a JSON Patch (RFC 6902) atomically; the object's metadata only comes back (a Secret's
        data is never received). A failing `test` op: Rejected (422), nothing written."""
        ...

    def delete(self, kind: Kind, namespace: str, name: str) -> None: ...

    def patch_status(
        self, kind: Kind, namespace: str, name: str, status: dict[str, Any]
    ) -> dict[str, Any]: ...

    def patch_scale(self, kind: Kind, namespace: str, name: str, replicas: int) -> dict[str, Any]: ...


def _path(kind: Kind, namespace: str, name: str | None = None, sub: str | None = None) -> str:
    """REST path; namespace "" lists across all namespaces."""
    path = (
        f"/{kind.prefix}/namespaces/{namespace}/{kind.plural}"
        if namespace
        else f"/{kind.prefix}/{kind.plural}"
    )
    if name:
        path += f"/{name}"
    if sub:
        path += f"/{sub}"
    return path


# The Accept header that makes the API server send PartialObjectMetadata(List): metadata only.
METADATA_ONLY = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json"
METADATA_ONLY_WATCH = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json"
# One object's metadata (a write's response): PartialObjectMetadata, with no fallback to the full object.
METADATA_ONLY_OBJECT = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"


class KubeClient:
    """`Kube` over the official client's ApiClient (in-cluster config, else kubeconfig).

    Every request but a watch takes a token from `limiter` first (the operator's QPS/burst)."""

    def __init__(
        self, api_client: Any | None = None, limiter: TokenBucket | None = None, pool_size: int = 16
    ) -> None:
        self.limiter = limiter or TokenBucket(0, 1)
        if api_client is None:
            import kubernetes

            configuration = kubernetes.client.Configuration()
            try:
                kubernetes.config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            except kubernetes.config.ConfigException:
                kubernetes.config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            # one kept-alive connection per concurrent caller (workers, loops): urllib3 opens and
            # throws away an extra connection (a TLS handshake) for each request above its pool size
            configuration.connection_pool_maxsize = pool_size
            api_client = kubernetes.client.ApiClient(configuration)
        self._api = api_client

    def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
        accept: str = "application/json",
    ) -> dict[str, Any]:
        response = self._send(method, path, body, query, content_type, accept)
        try:
            data = response.read()
        except Exception as e:  # the connection broke while reading the body
            raise ApiError(0, type(e).__name__, str(e)) from None
        return self._payload(int(response.status), data, response.getheader("Retry-After"))

    def _send(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
        accept: str = "application/json",
        timeout: Any = 30,
        limited: bool = True,
    ) -> Any:
        """Send one request; the response (not read yet), any status. Transport errors: ApiError(0)."""
        from kubernetes.client.exceptions import ApiException

        if limited:
            self.limiter.acquire()
        verb, url, headers, payload_body, post = self._api.param_serialize(
            method,
            path,
            query_params=query or [],
            header_params={"Accept": accept, "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = self._api.call_api(verb, url, headers, payload_body, post, _request_timeout=timeout)
        except ApiException as e:  # transport errors (status 0)
            metrics.API_REQUESTS.labels(verb=method, code=str(e.status)).inc()
            raise ApiError.for_status(int(e.status or 0), str(e.reason or ""), str(e.reason or "")) from None
        except Exception as e:  # urllib3: connection refused, reset, timed out
            metrics.API_REQUESTS.labels(verb=method, code="0").inc()
            raise ApiError(0, type(e).__name__, str(e)) from None
        metrics.API_REQUESTS.labels(verb=method, code=str(response.status)).inc()
        return response

    @staticmethod
    def _payload(status: int, data: Any, retry_after: str | None) -> dict[str, Any]:
        try:
            payload: dict[str, Any] = json.loads(data) if data else {}
        except ValueError:
            payload = {"message": data.decode(errors="replace") if isinstance(data, bytes) else str(data)}
        if not 200 <= status < 300:
            raise ApiError.for_status(
                status,
                str(payload.get("reason", "")),
                str(payload.get("message", payload)),
                retry_after_seconds(retry_after),
            )
        return payload

    def list_page(
        self,
        kind: Kind,
        namespace: str,
        label_selector: str,
        metadata_only: bool = False,
        limit: int = 500,
    ) -> tuple[list[dict[str, Any]], str]:
        """Every object of a LIST (in pages of `limit`) and the list's resourceVersion, to watch from."""
        items: list[dict[str, Any]] = []
        token = ""
        while True:
            query = [("limit", str(limit))]
            if label_selector:
                query.append(("labelSelector", label_selector))
            if token:
                query.append(("continue", token))
            response = self._send(
                "GET",
                _path(kind, namespace),
                query=query,
                accept=METADATA_ONLY if metadata_only else "application/json",
            )
            out = self._payload(int(response.status), response.read(), response.getheader("Retry-After"))
            items += out.get("items") or []
            meta = out.get("metadata") or {}
            token = str(meta.get("continue") or "")
            if not token:
                return items, str(meta.get("resourceVersion") or "")

    def watch(
        self,
        kind: Kind,
        namespace: str,
        label_selector: str,
        resource_version: str,
        timeout_seconds: int,
        metadata_only: bool = False,
    ) -> Iterator[dict[str, Any]]:
        """The events ({"type", "object"}) of one WATCH from `resource_version`, with bookmarks, until the
        server ends it after `timeout_seconds`. An ERROR event is raised as its ApiError (410: Gone)."""
        query = [
            ("watch", "true"),
            ("allowWatchBookmarks", "true"),
            ("resourceVersion", resource_version),
            ("timeoutSeconds", str(timeout_seconds)),
        ]
        if label_selector:
            query.append(("labelSelector", label_selector))
        response = self._send(
            "GET",
            _path(kind, namespace),
            query=query,
            accept=METADATA_ONLY_WATCH if metadata_only else "application/json",
            timeout=(10, timeout_seconds + 30),
            limited=False,
        )
        raw = response.response
        try:
            if not 200 <= int(response.status) < 300:
                self._payload(int(response.status), raw.read(), response.getheader("Retry-After"))
            buffer = b""
            for chunk in raw.stream(64 * 1024, decode_content=True):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue
                    event: dict[str, Any] = json.loads(line)
                    if event.get("type") == "ERROR":
                        obj = event.get("object") or {}
                        raise ApiError.for_status(
                            int(obj.get("code") or 0),
                            str(obj.get("reason") or ""),
                            str(obj.get("message") or ""),
                        )
                    yield event
        except ApiError:
            raise
        except Exception as e:  # a broken stream (urllib3's errors, OSError) or a garbled line
            raise ApiError(0, type(e).__name__, str(e)) from None
        finally:
            raw.release_conn()

    def get(self, kind: Kind, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._call("GET", _path(kind, namespace, name))
        except NotFound:
            return None

    def list(self, kind: Kind, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        query = [("labelSelector", label_selector)] if label_selector else []
        out = self._call("GET", _path(kind, namespace), query=query)
        items: list[dict[str, Any]] = out.get("items", [])
        return items

    def create(
        self, kind: Kind, namespace: str, body: dict[str, Any], dry_run: bool = False
    ) -> dict[str, Any] | None:
        """Create; None when it already exists (409 is success for a level-triggered reconcile)."""
        try:
            query = [("dryRun", "All")] if dry_run else None
            return self._call("POST", _path(kind, namespace), body=body, query=query)
        except Conflict:
            log.debug("%s %s/%s exists already", kind.kind, namespace, body["metadata"].get("name"))
            return None

    def patch(self, kind: Kind, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._call(
            "PATCH", _path(kind, namespace, name), body=body, content_type="application/merge-patch+json"
        )

    def json_patch(self, kind: Kind, namespace: str, name: str, ops: JsonPatch) -> dict[str, Any]:
        return self._call(
            "PATCH",
            _path(kind, namespace, name),
            body=ops,
            content_type="application/json-patch+json",
            accept=METADATA_ONLY_OBJECT,
        )

    def delete(self, kind: Kind, namespace: str, name: str) -> None:
        with contextlib.suppress(NotFound):  # gone already: success for a delete
            self._call("DELETE", _path(kind, namespace, name), body={"propagationPolicy": "Background"})

    def patch_status(self, kind: Kind, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        return self._call(
            "PATCH",
            _path(kind, namespace, name, "status"),
            body={"status": status},
            content_type="application/merge-patch+json",
        )

    def patch_scale(self, kind: Kind, namespace: str, name: str, replicas: int) -> dict[str, Any]:
        return self._call(
            "PATCH",
            _path(kind, namespace, name, "scale"),
            body={"spec": {"replicas": replicas}},
            content_type="application/merge-patch+json",
        )
