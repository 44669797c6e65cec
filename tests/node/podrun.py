"""Run a container of a Kubernetes pod spec with `docker run`, as kubelet would run it.

`docker_run_argv(pod_spec, container, secrets)` translates what the Berth builders put into a pod:
user/group/fsGroup, read-only root filesystem, dropped capabilities, no privilege escalation,
seccomp RuntimeDefault (Docker's default profile), CPU and memory limits, env (plain values),
emptyDir volumes as tmpfs (medium Memory with its sizeLimit; /dev/shm as the shm size), Secret
volumes as read-only directories of files with the Secret's mode and the pod's fsGroup, the command
and args. Anything else in the spec is refused (pytest.fail), so a new field in the builder cannot
silently be left out of the test.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

_UNITS = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4, "k": 1000, "M": 1000**2, "G": 1000**3}


def quantity_bytes(q: str) -> int:
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q))
    if not m or (m.group(2) and m.group(2) not in _UNITS):
        pytest.fail(f"unsupported quantity {q!r}")
    return int(float(m.group(1)) * _UNITS.get(m.group(2), 1))


def quantity_cpus(q: str) -> str:
    s = str(q)
    return str(int(s[:-1]) / 1000) if s.endswith("m") else s


def write_secret(directory: Path, secret: Mapping[str, Any], mode: int, gid: int | None) -> Path:
    """The files a Secret volume shows: one per data key, the volume's defaultMode, group fsGroup."""
    import os

    directory.mkdir(parents=True, exist_ok=True)
    for key, value in (secret.get("data") or {}).items():
        f = directory / key
        f.write_bytes(base64.b64decode(value))
        if gid is not None:
            os.chown(f, 0, gid)
        f.chmod(mode)
    directory.chmod(0o755)
    return directory


ALLOWED_CONTAINER_KEYS = {
    "name",
    "image",
    "imagePullPolicy",
    "args",
    "command",
    "env",
    "ports",
    "resources",
    "securityContext",
    "volumeMounts",
    "startupProbe",
    "readinessProbe",
    "livenessProbe",
    "lifecycle",
}


def _security_args(pod_spec: Mapping[str, Any], c: Mapping[str, Any]) -> list[str]:
    psc = pod_spec.get("securityContext") or {}
    sc = c.get("securityContext") or {}
    argv: list[str] = []
    uid = sc.get("runAsUser", psc.get("runAsUser"))
    gid = sc.get("runAsGroup", psc.get("runAsGroup"))
    if uid is not None:
        argv += ["--user", f"{uid}:{gid if gid is not None else uid}"]
    elif sc.get("runAsNonRoot") or psc.get("runAsNonRoot"):
        pytest.fail("runAsNonRoot without runAsUser: kubelet would check the image's USER")
    if psc.get("fsGroup") is not None:
        argv += ["--group-add", str(psc["fsGroup"])]
    if sc.get("readOnlyRootFilesystem"):
        argv.append("--read-only")
    if sc.get("privileged"):
        pytest.fail("privileged containers are not translated")
    caps = sc.get("capabilities") or {}
    argv += [a for cap in caps.get("drop") or [] for a in ("--cap-drop", cap)]
    argv += [a for cap in caps.get("add") or [] for a in ("--cap-add", cap)]
    if sc.get("allowPrivilegeEscalation") is False:
        argv += ["--security-opt", "no-new-privileges"]
    seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type", "RuntimeDefault")
    if seccomp != "RuntimeDefault":  # Docker applies its default profile, the RuntimeDefault equivalent
        pytest.fail(f"seccompProfile {seccomp} is not translated")
    return argv


def _resource_and_env_args(c: Mapping[str, Any]) -> list[str]:
    argv: list[str] = []
    limits = (c.get("resources") or {}).get("limits") or {}
    if "cpu" in limits:
        argv += ["--cpus", quantity_cpus(limits["cpu"])]
    if "memory" in limits:
        argv += ["--memory", str(quantity_bytes(limits["memory"]))]
    for e in c.get("env") or []:
        if "value" not in e:
            pytest.fail(f"env {e['name']}: only plain values are translated ({e})")
        argv += ["--env", f"{e['name']}={e['value']}"]
    return argv


def _volume_args(
    pod_spec: Mapping[str, Any], c: Mapping[str, Any], secrets: Mapping[str, Mapping[str, Any]], scratch: Path
) -> list[str]:
    argv: list[str] = []
    volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
    fs_group = (pod_spec.get("securityContext") or {}).get("fsGroup")
    for m in c.get("volumeMounts") or []:
        vol, path = volumes[m["name"]], m["mountPath"]
        if "emptyDir" in vol:
            size = (vol["emptyDir"] or {}).get("sizeLimit")
            if path == "/dev/shm":
                argv += ["--shm-size", str(quantity_bytes(size) if size else 64 * 1024**2)]
            else:  # an emptyDir is a writable, exec-able directory for every user of the pod
                opts = "tmpfs-mode=1777" + (f",tmpfs-size={quantity_bytes(size)}" if size else "")
                argv += ["--mount", f"type=tmpfs,destination={path},{opts}"]
        elif "secret" in vol:
            ref = vol["secret"]["secretName"]
            if ref not in secrets:
                pytest.fail(f"volume {m['name']}: Secret {ref} not given")
            mode = vol["secret"].get("defaultMode", 0o644)
            d = write_secret(scratch / f"secret-{m['name']}", secrets[ref], mode, fs_group)
            argv += ["--mount", f"type=bind,source={d},destination={path},readonly"]
        else:
            pytest.fail(f"volume {m['name']}: only emptyDir and secret are translated ({vol})")
    return argv


def docker_run_argv(
    pod_spec: Mapping[str, Any],
    container_name: str,
    secrets: Mapping[str, Mapping[str, Any]],
    scratch: Path,
    name: str,
) -> list[str]:
    """`docker run -d ...` for one container of pod_spec. `secrets`: Secret objects by name."""
    c = next(x for x in pod_spec["containers"] if x["name"] == container_name)
    unknown = set(c) - ALLOWED_CONTAINER_KEYS
    if unknown:
        pytest.fail(f"podrun does not translate container fields {sorted(unknown)}")
    argv = ["docker", "run", "-d", "--name", name, "--network", "bridge"]
    argv += _security_args(pod_spec, c)
    argv += _resource_and_env_args(c)
    argv += _volume_args(pod_spec, c, secrets, scratch)
    if c.get("command"):
        argv += ["--entrypoint", c["command"][0]]
    argv.append(c["image"])
    argv += [*c.get("command", [])[1:], *c.get("args", [])]
    return argv


def container_port(container: Mapping[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    pytest.fail(f"no container port named {port}")
