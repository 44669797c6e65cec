"""A real Kubernetes node beside the kwok nodes of the local control plane (docs/cluster.md, "A real node").

`RealNodeCluster` is a `LocalCluster` (etcd, kube-apiserver, controller manager, scheduler, kwok) plus
one node that runs containers: kubelet, containerd + runc, the bridge/host-local CNI plugins,
kube-proxy (iptables mode: Service VIPs), kube-router's NetworkPolicy firewall and CoreDNS (as a pod),
all built from the Go module proxy by tools/node/build.sh with the control plane's Kubernetes pin.

The node lives in a network namespace of its own (`berth-node`), joined to the machine by one veth
pair, so its iptables rules, routes and sysctls never touch the machine's own:

    machine (kube-apiserver, etcd, tests)  10.201.0.1/30 ==veth== 10.201.0.2/30  netns berth-node
                                                                   (kubelet, containerd, kube-proxy,
                                                                    kube-router; bridge cni0
                                                                    10.202.0.1/24 -> pods 10.202.0.0/24)

kube-apiserver listens on (and advertises) 10.201.0.1, so pods reach it through the `kubernetes`
Service. The node has no default route and the machine routes only 10.202.0.0/24 to it: nothing a
pod sends can leave the machine. Images come from the local Docker engine (`docker save` |
`ctr images import`), never from a registry; containerd's image store is kept in
~/.cache/berth/node-containerd-<version> so an unchanged image is imported once.

Needs root, cgroups, iproute2, iptables, ipset, nsenter, Docker with the images, and the binaries of
tools/node/build.sh. `node_prerequisites()` names what is missing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

try:
    from tests.cluster.harness import (
        REPO_ROOT,
        SERVICE_CIDR,
        ClusterStartError,
        Component,
        LocalCluster,
        NodeSpec,
        _alive,
        _die_with_parent,
        _stop_group,
        cache_dir,
        write_kubeconfig,
    )
except ImportError:  # pragma: no cover - run as a script from tests/cluster
    sys.path.insert(0, str(Path(__file__).parent))
    from harness import (  # type: ignore[no-redef]
        REPO_ROOT,
        SERVICE_CIDR,
        ClusterStartError,
        Component,
        LocalCluster,
        NodeSpec,
        _alive,
        _die_with_parent,
        _stop_group,
        cache_dir,
        write_kubeconfig,
    )

log = logging.getLogger(__name__)

NODE_BUILD_SCRIPT = REPO_ROOT / "tools" / "node" / "build.sh"
NODE_BINARIES = (
    "kubelet",
    "kube-proxy",
    "containerd",
    "containerd-shim-runc-v2",
    "ctr",
    "runc",
    "crictl",
    "coredns",
    "kube-router",
    "pause",
    "cni/bridge",
    "cni/host-local",
    "cni/loopback",
    "cni/portmap",
)
CONTAINERD_VERSION = "v2.4.2"  # keep in step with tools/node/build.sh
COREDNS_VERSION = "v1.15.0"
PAUSE_VERSION = "3.10.2"

NODE_NAME = "berth-node-0"
NETNS = "berth-node"
HOST_IF, NODE_IF = "berth-h0", "berth-n0"
HOST_IP, NODE_IP, LINK_PREFIX = "10.201.0.1", "10.201.0.2", 30
POD_CIDR = "10.202.0.0/24"  # this node's pods (host-local IPAM, node.spec.podCIDR)
CLUSTER_CIDR = "10.202.0.0/16"  # all real pods (kube-proxy's notion of "inside the cluster")
BRIDGE, BRIDGE_IP = "cni0", "10.202.0.1"
DNS_IP = "10.96.0.10"
CLUSTER_DOMAIN = "cluster.local"
CGROUP_ROOT = "/berth-node"
PAUSE_IMAGE = f"berth.local/pause:{PAUSE_VERSION}"
COREDNS_IMAGE = f"berth.local/coredns:{COREDNS_VERSION}"
K8S_NAMESPACE = "k8s.io"  # containerd namespace of the CRI plugin
STATE_DIR = Path("/run/berth-node")  # owner record and lock (one real node per machine)
REAL_NODE_LABEL = "berth.dev/real-node"
# kwok nodes in a RealNodeCluster carry this taint, so workloads without a toleration land on the real node.
SIMULATED_TAINT = {"key": "berth.dev/simulated", "value": "true", "effect": "NoSchedule"}


class NodeUnavailable(RuntimeError):
    """The machine cannot run a real node (what is missing is in the message)."""


# --------------------------------------------------------------------------------------------------
# binaries and prerequisites


def node_bin_dir() -> Path:
    override = os.environ.get("BERTH_NODE_BIN")
    if override:
        return Path(override)
    out = subprocess.run(
        ["bash", str(NODE_BUILD_SCRIPT), "--dir"], capture_output=True, text=True, check=True
    )
    return Path(out.stdout.strip())


def node_binaries_present(bin_dir: Path) -> bool:
    return all(os.access(bin_dir / b, os.X_OK) for b in NODE_BINARIES)


def ensure_node_binaries(build: bool = True) -> Path:
    bin_dir = node_bin_dir()
    if node_binaries_present(bin_dir):
        return bin_dir
    if not build or os.environ.get("BERTH_NODE_BIN"):
        raise FileNotFoundError(f"node binaries missing in {bin_dir}; run `tools/node/build.sh`")
    proc = subprocess.run(["bash", str(NODE_BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True, check=True)
    built = Path(proc.stdout.strip().splitlines()[-1])
    if not node_binaries_present(built):
        raise FileNotFoundError(f"tools/node/build.sh finished but {built} is incomplete")
    return built


def node_prerequisites() -> list[str]:
    """What this machine lacks for a real node (empty: it can try)."""
    missing: list[str] = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces, cgroups, mounts)")
    if not Path("/sys/fs/cgroup").is_dir():
        missing.append("/sys/fs/cgroup")
    for tool in ("ip", "iptables", "iptables-restore", "ipset", "nsenter", "mount", "umount"):
        if shutil.which(tool) is None:
            missing.append(f"{tool} (apt-get install iproute2 iptables ipset util-linux)")
    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True).returncode:
        missing.append("a Docker engine with the images (tools/docker/engine.sh start; make images)")
    return missing


def _run(
    argv: Sequence[str], check: bool = True, input: str | bytes | None = None, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(argv), capture_output=True, text=True, input=input, timeout=timeout)
    if check and r.returncode != 0:
        raise ClusterStartError(
            f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}"
        )
    return r


def in_netns(*argv: str) -> list[str]:
    """argv, run inside the node's network namespace (only the network namespace: mounts are shared)."""
    return ["nsenter", f"--net=/run/netns/{NETNS}", "--", *argv]


# --------------------------------------------------------------------------------------------------
# the machine side: network namespace, veth, route, cgroups, mounts


def _mounts_under(roots: Iterable[Path]) -> list[str]:
    """Mount points below any of roots, deepest first."""
    prefixes = [str(r).rstrip("/") + "/" for r in roots]
    points: list[str] = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if any(point.startswith(p) or point + "/" == p for p in prefixes):
                points.append(point)
    return sorted(set(points), key=lambda p: p.count("/"), reverse=True)


def unmount_under(roots: Iterable[Path]) -> None:
    for point in _mounts_under(list(roots)):
        subprocess.run(["umount", "-l", point], capture_output=True)


def _cgroup_pids(root: str) -> set[int]:
    pids: set[int] = set()
    for base in (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")):
        top = base / root.lstrip("/")
        if not top.is_dir():
            continue
        for procs in top.rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(x) for x in procs.read_text().split())
    return pids


def ensure_cgroup_root(root: str = CGROUP_ROOT) -> None:
    """kubelet's cgroupRoot must exist in every cgroup v1 hierarchy (a new cpuset gets its parent's CPUs
    and memory nodes, else nothing can join it)."""
    base = Path("/sys/fs/cgroup")
    for hierarchy in sorted(p for p in base.iterdir() if p.is_dir() and (p / "cgroup.procs").exists()):
        parent = hierarchy
        for part in Path(root.lstrip("/")).parts:
            d = parent / part
            d.mkdir(exist_ok=True)
            for f in ("cpuset.cpus", "cpuset.mems"):
                if (d / f).exists() and not (d / f).read_text().strip():
                    (d / f).write_text((parent / f).read_text())
            parent = d


def kill_cgroup(root: str = CGROUP_ROOT) -> None:
    """SIGKILL every process in the node's cgroups (containers left behind), then remove the cgroups."""
    for _ in range(20):
        pids = _cgroup_pids(root)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    for base in Path("/sys/fs/cgroup").iterdir():
        top = base / root.lstrip("/")
        if top.is_dir():
            for d in sorted(
                (p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
            ):
                with contextlib.suppress(OSError):
                    d.rmdir()
            with contextlib.suppress(OSError):
                top.rmdir()


def network_down() -> None:
    """Remove the node's network namespace (and with it the veth pair and everything inside) and the route."""
    if Path(f"/run/netns/{NETNS}").exists():
        pids = _run(["ip", "netns", "pids", NETNS], check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
    _run(["ip", "route", "del", POD_CIDR, "via", NODE_IP], check=False)
    _run(["ip", "link", "del", HOST_IF], check=False)
    _run(["ip", "netns", "del", NETNS], check=False)


def network_up() -> None:
    _run(["ip", "netns", "add", NETNS])
    _run(["ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", NODE_IF, "netns", NETNS])
    _run(["ip", "addr", "add", f"{HOST_IP}/{LINK_PREFIX}", "dev", HOST_IF])
    _run(["ip", "link", "set", HOST_IF, "up"])
    _run(in_netns("ip", "link", "set", "lo", "up"))
    _run(in_netns("ip", "addr", "add", f"{NODE_IP}/{LINK_PREFIX}", "dev", NODE_IF))
    _run(in_netns("ip", "link", "set", NODE_IF, "up"))
    # The bridge up front, so kube-router and kube-proxy see it from their start (the CNI plugin adopts it).
    _run(in_netns("ip", "link", "add", BRIDGE, "type", "bridge"))
    _run(in_netns("ip", "addr", "add", f"{BRIDGE_IP}/24", "dev", BRIDGE))
    _run(in_netns("ip", "link", "set", BRIDGE, "up"))
    # Inside the namespace only: route between the bridge and the veth, and let bridged pod-to-pod
    # traffic pass iptables (Service VIP replies to a pod on the same bridge, NetworkPolicy).
    for key in ("net.ipv4.ip_forward=1", "net.bridge.bridge-nf-call-iptables=1"):
        _run(in_netns("sysctl", "-q", "-w", key))
    # The machine reaches the pods (and their replies find the apiserver) through the veth.
    _run(["ip", "route", "add", POD_CIDR, "via", NODE_IP])


class _Owner:
    """/run/berth-node/owner.json: which process and workdir hold the machine's one real node."""

    path = STATE_DIR / "owner.json"

    @classmethod
    def read(cls) -> dict[str, Any] | None:
        try:
            return dict(json.loads(cls.path.read_text()))
        except (OSError, ValueError):
            return None

    @classmethod
    def alive(cls, rec: dict[str, Any]) -> bool:
        return any(_alive(int(p)) for p in [rec.get("pid", 0), *rec.get("pids", {}).values()] if p)

    @classmethod
    def write(cls, rec: dict[str, Any]) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = cls.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=2))
        tmp.replace(cls.path)


@contextlib.contextmanager
def _machine_lock() -> Any:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(STATE_DIR / "lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def sweep_stale_node(rec: dict[str, Any]) -> None:
    """Tear down what a dead session's node left: processes, cgroups, mounts, network namespace."""
    log.warning("removing the real node left by pid %s (workdir %s)", rec.get("pid"), rec.get("workdir"))
    for pid in rec.get("pids", {}).values():
        with contextlib.suppress(ProcessLookupError, PermissionError, TypeError):
            os.killpg(int(pid), signal.SIGKILL)
    kill_cgroup(rec.get("cgroup_root", CGROUP_ROOT))
    roots = [Path(p) for p in rec.get("mount_roots", [])]
    unmount_under(roots)
    network_down()
    workdir = rec.get("workdir")
    if workdir and Path(workdir).is_dir() and rec.get("remove_workdir", True):
        shutil.rmtree(workdir, ignore_errors=True)
    with contextlib.suppress(OSError):
        _Owner.path.unlink()


# --------------------------------------------------------------------------------------------------
# configuration files


def containerd_config(bin_dir: Path, root: Path, state: Path, sock: Path, cni_conf: Path) -> str:
    return f"""\
version = 3
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.blockfile",
                    "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[plugins."io.containerd.cri.v1.runtime"]
  enable_selinux = false
  # Where this process lacks CAP_SYS_RESOURCE (these machines' sandbox drops it), no process may lower
  # its oom_score_adj; containerd's default -998 for sandboxes then fails in runc init ("failed to
  # update /proc/self/oom_score_adj: Permission denied", seen by runc < 1.2 only as "can't get final
  # child's PID from pipe: EOF"). This keeps every container's score at or above containerd's own.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{bin_dir / "runc"}"
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{bin_dir / "cni"}"]
    conf_dir = "{cni_conf}"
    max_conf_num = 1

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{PAUSE_IMAGE}"

[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"""


def cni_config(ipam_dir: Path) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": "berth",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,  # nothing leaves the machine: no NAT
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_CIDR, "gateway": BRIDGE_IP}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(ipam_dir),
                },
            }
        ],
    }


def kubelet_config(ca: Path, sock: Path, pod_logs: Path) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_IP,
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": NODE_IP,
        "healthzPort": 10248,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(ca)},
        },
        "authorization": {"mode": "Webhook"},
        "containerRuntimeEndpoint": f"unix://{sock}",
        "imageServiceEndpoint": f"unix://{sock}",
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": CGROUP_ROOT,
        "failCgroupV1": False,  # this machine has cgroup v1 (kubelet keeps it supported behind this switch)
        "failSwapOn": False,
        "clusterDNS": [DNS_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": "",  # pods get no DNS of the machine: cluster names only
        "podLogsDir": str(pod_logs),
        "maxPods": 40,
        "serializeImagePulls": False,
        # a busy shared disk must not evict the test's pods or collect its preloaded images
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "shutdownGracePeriod": "0s",
        "oomScoreAdj": 0,  # leave the score as it is (lowering it needs CAP_SYS_RESOURCE)
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
    }


def kube_proxy_config(kubeconfig: Path) -> dict[str, Any]:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": NODE_NAME,
        "bindAddress": NODE_IP,
        "healthzBindAddress": f"{NODE_IP}:10256",
        "metricsBindAddress": f"{NODE_IP}:10249",
        "mode": "iptables",
        "clusterCIDR": CLUSTER_CIDR,
        "detectLocalMode": "ClusterCIDR",
        "oomScoreAdj": 0,
        "nodePortAddresses": ["primary"],
        # conntrack sysctls are the machine's (not per network namespace): leave them alone
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
    }


def bootstrap_manifests() -> list[dict[str, Any]]:
    """RBAC for the node's components and CoreDNS (ServiceAccount, role, Corefile, Deployment, Service)."""
    coredns_labels = {"k8s-app": "kube-dns"}
    corefile = f"""\
.:53 {{
    errors
    health :8080
    ready :8181
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }}
    cache 5
    loop
    reload
}}
"""
    return [
        # kube-apiserver -> kubelet (logs, exec, port-forward)
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "berth:kube-apiserver-kubelet-client"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "system:kubelet-api-admin",
            },
            "subjects": [
                {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "User",
                    "name": "kube-apiserver-kubelet-client",
                }
            ],
        },
        # kube-router's NetworkPolicy controller: reads pods, namespaces, policies, nodes
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "berth:kube-router"},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["namespaces", "pods", "services", "nodes", "endpoints"],
                    "verbs": ["get", "list", "watch"],
                },
                {
                    "apiGroups": ["networking.k8s.io"],
                    "resources": ["networkpolicies"],
                    "verbs": ["get", "list", "watch"],
                },
                {
                    "apiGroups": ["discovery.k8s.io"],
                    "resources": ["endpointslices"],
                    "verbs": ["get", "list", "watch"],
                },
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "berth:kube-router"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "berth:kube-router",
            },
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "kube-router"}],
        },
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "coredns", "namespace": "kube-system"},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "berth:coredns"},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["endpoints", "services", "pods", "namespaces"],
                    "verbs": ["list", "watch"],
                },
                {
                    "apiGroups": ["discovery.k8s.io"],
                    "resources": ["endpointslices"],
                    "verbs": ["list", "watch"],
                },
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "berth:coredns"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "berth:coredns",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": "kube-system"}],
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "coredns", "namespace": "kube-system"},
            "data": {"Corefile": corefile},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "coredns", "namespace": "kube-system", "labels": coredns_labels},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": coredns_labels},
                "template": {
                    "metadata": {"labels": coredns_labels},
                    "spec": {
                        "serviceAccountName": "coredns",
                        "dnsPolicy": "Default",
                        "nodeSelector": {REAL_NODE_LABEL: "true"},
                        "containers": [
                            {
                                "name": "coredns",
                                "image": COREDNS_IMAGE,
                                "imagePullPolicy": "Never",
                                "args": ["-conf", "/etc/coredns/Corefile"],
                                "ports": [
                                    {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                                    {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"},
                                ],
                                "resources": {
                                    "requests": {"cpu": "50m", "memory": "32Mi"},
                                    "limits": {"memory": "128Mi"},
                                },
                                "securityContext": {
                                    "allowPrivilegeEscalation": False,
                                    "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]},
                                },
                                "volumeMounts": [
                                    {"name": "config", "mountPath": "/etc/coredns", "readOnly": True}
                                ],
                                "readinessProbe": {
                                    "httpGet": {"path": "/ready", "port": 8181},
                                    "periodSeconds": 2,
                                },
                                "livenessProbe": {
                                    "httpGet": {"path": "/health", "port": 8080},
                                    "periodSeconds": 10,
                                },
                            }
                        ],
                        "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": coredns_labels},
            "spec": {
                "clusterIP": DNS_IP,
                "selector": coredns_labels,
                "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
                ],
            },
        },
    ]


# --------------------------------------------------------------------------------------------------
# images: built locally, loaded into containerd without a registry


def docker_image_id(ref: str) -> str | None:
    r = _run(["docker", "image", "inspect", "--format", "{{.Id}}", ref], check=False)
    return r.stdout.strip() if r.returncode == 0 else None


def ensure_binary_image(ref: str, binary: Path, entrypoint: str) -> None:
    """A one-file image (pause, CoreDNS) in Docker: `docker import` of a tarball with the static binary,
    labelled with the binary's sha256 so an unchanged binary keeps its image (and its containerd copy)."""
    import hashlib
    import tarfile
    import tempfile

    digest = hashlib.sha256(binary.read_bytes()).hexdigest()
    r = _run(
        ["docker", "image", "inspect", "--format", '{{index .Config.Labels "berth.binary.sha256"}}', ref],
        check=False,
    )
    if r.returncode == 0 and r.stdout.strip() == digest:
        return
    with tempfile.TemporaryDirectory() as tmp:
        tarball = Path(tmp) / "rootfs.tar"
        with tarfile.open(tarball, "w") as tar:
            info = tar.gettarinfo(str(binary), arcname=entrypoint.lstrip("/"))
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mode = 0o755
            with binary.open("rb") as f:
                tar.addfile(info, f)
        _run(
            [
                "docker",
                "import",
                "--change",
                f'ENTRYPOINT ["{entrypoint}"]',
                "--change",
                f"LABEL berth.binary.sha256={digest}",
                str(tarball),
                ref,
            ]
        )


class ImageLoader:
    """Copies images from Docker into the node's containerd, once per Docker image id."""

    def __init__(self, ctr: list[str], stamp: Path) -> None:
        self.ctr = ctr
        self.stamp = stamp

    def _stamps(self) -> dict[str, str]:
        try:
            return dict(json.loads(self.stamp.read_text()))
        except (OSError, ValueError):
            return {}

    def _present(self, ref: str) -> bool:
        r = _run([*self.ctr, "images", "ls", "-q", f"name=={ref}"], check=False)
        return ref in r.stdout.split()

    def load(self, refs: Iterable[str]) -> dict[str, float]:
        """Import each ref whose Docker image id changed since the last import; seconds per imported ref."""
        stamps = self._stamps()
        took: dict[str, float] = {}
        for ref in refs:
            image_id = docker_image_id(ref)
            if image_id is None:
                raise ClusterStartError(f"image {ref} is not in the local Docker engine (make images)")
            if stamps.get(ref) == image_id and self._present(ref):
                continue
            t0 = time.monotonic()
            save = subprocess.Popen(["docker", "save", ref], stdout=subprocess.PIPE)
            assert save.stdout is not None
            imp = subprocess.run(
                [*self.ctr, "images", "import", "--local", "-"],
                stdin=save.stdout,
                capture_output=True,
                text=True,
            )
            save.stdout.close()
            if save.wait() != 0 or imp.returncode != 0:
                raise ClusterStartError(f"loading {ref} into containerd failed: {imp.stderr.strip()}")
            stamps[ref] = image_id
            self.stamp.write_text(json.dumps(stamps, indent=2))
            took[ref] = time.monotonic() - t0
            log.info("loaded %s into the node in %.1fs", ref, took[ref])
        return took


# --------------------------------------------------------------------------------------------------
# the cluster


DEFAULT_KWOK_NODES: tuple[NodeSpec, ...] = (NodeSpec("kwok-gpu-0", gpus=4, taints=(SIMULATED_TAINT,)),)


class RealNodeCluster(LocalCluster):
    """LocalCluster + one real node (`berth-node-0`) in its own network namespace.

    `images`: Docker image references to load into the node before it starts (e.g. the operator and
    server-cpu images of `make images`). The kwok nodes (default: one simulated GPU node) are tainted
    `berth.dev/simulated=true:NoSchedule`, so pods without that toleration run on the real node.
    """

    bind_address = HOST_IP
    advertise_address = HOST_IP

    def __init__(
        self,
        images: Sequence[str] = (),
        node_bin: Path | None = None,
        nodes: Iterable[NodeSpec] = DEFAULT_KWOK_NODES,
        node_timeout: float = 240.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(nodes=nodes, **kwargs)
        self.node_bin = Path(node_bin) if node_bin else ensure_node_binaries(build=False)
        self.images = list(images)
        self.node_timeout = node_timeout
        self.node_dir = self.workdir / "node"
        self.containerd_root = cache_dir() / f"node-containerd-{CONTAINERD_VERSION}"
        self.containerd_state = self.node_dir / "containerd-state"
        self.containerd_sock = self.node_dir / "run" / "containerd.sock"
        self.kubelet_root = self.node_dir / "kubelet"
        self.node_name = NODE_NAME
        self.node_ip = NODE_IP
        self.image_load_seconds: dict[str, float] = {}
        self.node_startup_seconds: float | None = None
        self._owns_machine = False
        self._node_stopped = False

    # ---- helpers for tests ------------------------------------------------------------------------

    @property
    def ctr(self) -> list[str]:
        return [
            str(self.node_bin / "ctr"),
            "--address",
            str(self.containerd_sock),
            "--namespace",
            K8S_NAMESPACE,
        ]

    def crictl(
        self, *args: str, check: bool = False, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """crictl against the node's containerd (e.g. `crictl("ps", "-o", "json")`)."""
        cmd = [
            str(self.node_bin / "crictl"),
            "--runtime-endpoint",
            f"unix://{self.containerd_sock}",
            "--image-endpoint",
            f"unix://{self.containerd_sock}",
            "--timeout",
            "30s",
            *args,
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise subprocess.CalledProcessError(r.returncode, cmd, r.stdout, r.stderr)
        return r

    def load_images(self, refs: Iterable[str]) -> dict[str, float]:
        took = ImageLoader(self.ctr, self.containerd_root / "berth-images.json").load(refs)
        self.image_load_seconds.update(took)
        return took

    # ---- lifecycle --------------------------------------------------------------------------------

    def _pki_clients(self) -> dict[str, tuple[str, list[str]]]:
        return {
            **super()._pki_clients(),
            "kubelet": (f"system:node:{NODE_NAME}", ["system:nodes"]),
            "kube-proxy": ("system:kube-proxy", []),  # bound to system:node-proxier by default
            "kube-router": ("kube-router", []),
            "apiserver-kubelet": ("kube-apiserver-kubelet-client", []),
        }

    def _apiserver_extra_args(self) -> list[str]:
        assert self.pki is not None
        crt, key = self.pki.clients["apiserver-kubelet"]
        return [
            f"--kubelet-client-certificate={crt}",
            f"--kubelet-client-key={key}",
            "--kubelet-preferred-address-types=InternalIP",
        ]

    def _prepare(self) -> None:
        missing = node_prerequisites()
        if missing:
            raise NodeUnavailable("a real node needs: " + "; ".join(missing))
        self._claim_machine()
        network_up()
        super()._prepare()

    def _claim_machine(self) -> None:
        with _machine_lock():
            rec = _Owner.read()
            if rec is not None and _Owner.alive(rec) and rec.get("pid") != os.getpid():
                raise NodeUnavailable(
                    f"another real node runs on this machine (pid {rec.get('pid')}, {rec.get('workdir')}); "
                    "one at a time"
                )
            if rec is not None or Path(f"/run/netns/{NETNS}").exists():
                sweep_stale_node(rec or {})
            self._owns_machine = True
            self._record_owner()

    def _record_owner(self) -> None:
        _Owner.write(
            {
                "pid": os.getpid() if not self.detach else 0,
                "workdir": str(self.workdir),
                "remove_workdir": self._own_workdir or self.detach,
                "pids": {n: c.pid for n, c in self.components.items() if c.pid},
                "cgroup_root": CGROUP_ROOT,
                "mount_roots": [str(self.node_dir), str(self.containerd_root)],
            }
        )

    def start(self) -> RealNodeCluster:
        super().start()
        t0 = time.monotonic()
        try:
            self._start_node()
        except BaseException:
            self.stop()
            raise
        self.node_startup_seconds = time.monotonic() - t0
        log.info("real node %s up in %.1fs", NODE_NAME, self.node_startup_seconds)
        if self.detach:
            self._write_state()
        return self

    def _write_node_files(self) -> None:
        assert self.pki is not None
        d = self.node_dir
        for sub in ("run", "cni-conf", "cni-ipam", "kubelet", "pod-logs", "containerd-state"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        self.containerd_root.mkdir(parents=True, exist_ok=True)
        (d / "containerd.toml").write_text(
            containerd_config(
                self.node_bin,
                self.containerd_root,
                self.containerd_state,
                self.containerd_sock,
                d / "cni-conf",
            )
        )
        (d / "cni-conf" / "10-berth.conflist").write_text(json.dumps(cni_config(d / "cni-ipam"), indent=2))
        (d / "kubelet-config.json").write_text(
            json.dumps(kubelet_config(self.pki.ca_cert, self.containerd_sock, d / "pod-logs"), indent=2)
        )
        for name in ("kubelet", "kube-proxy", "kube-router"):
            crt, key = self.pki.clients[name]
            write_kubeconfig(d / f"{name}.kubeconfig", self.server, self.pki.ca_cert, crt, key, user=name)
        (d / "kube-proxy.json").write_text(
            json.dumps(kube_proxy_config(d / "kube-proxy.kubeconfig"), indent=2)
        )

    def _node_argv(self) -> dict[str, list[str]]:
        b, d = self.node_bin, self.node_dir
        return {
            "containerd": [str(b / "containerd"), f"--config={d / 'containerd.toml'}", "--log-level=info"],
            "kubelet": [
                str(b / "kubelet"),
                f"--config={d / 'kubelet-config.json'}",
                f"--kubeconfig={d / 'kubelet.kubeconfig'}",
                f"--root-dir={self.kubelet_root}",
                f"--cert-dir={d / 'kubelet-pki'}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={NODE_IP}",
                f"--node-labels={REAL_NODE_LABEL}=true",
                f"--v={max(self.verbosity, 1)}",
            ],
            "kube-proxy": [
                str(b / "kube-proxy"),
                f"--config={d / 'kube-proxy.json'}",
                f"--v={self.verbosity}",
            ],
            "kube-router": [
                str(b / "kube-router"),
                f"--kubeconfig={d / 'kube-router.kubeconfig'}",
                f"--hostname-override={NODE_NAME}",
                "--run-firewall=true",
                "--run-router=false",
                "--run-service-proxy=false",
                "--enable-cni=false",
                "--enable-ipv4=true",
                "--enable-ipv6=false",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--metrics-port=0",
                "--health-port=20244",
                f"--v={self.verbosity}",
            ],
        }

    def _spawn_node(self, name: str, argv: list[str]) -> Component:
        comp = Component(name, in_netns(*argv), self.logs_dir / f"{name}.log")
        self.components[name] = comp
        attach = not self.detach and threading.current_thread() is threading.main_thread()
        with comp.log_path.open("ab") as logf:
            comp.proc = subprocess.Popen(
                comp.argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=self.node_dir,
                start_new_session=True,
                preexec_fn=_die_with_parent if attach else None,
                env={
                    **os.environ,
                    "PATH": f"{self.node_bin}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
                    "HOME": str(self.node_dir),
                },
            )
        self._record_owner()
        return comp

    def _wait(self, what: str, predicate: Any, deadline: float, names: Sequence[str] = ()) -> Any:
        last: Any = None
        while time.monotonic() < deadline:
            for n in names:
                c = self.components[n]
                if c.proc is not None and c.proc.poll() is not None:
                    raise ClusterStartError(
                        f"{n} exited with {c.proc.returncode} while waiting for {what}:\n{c.log_tail()}"
                    )
            last = predicate()
            if last:
                return last
            time.sleep(0.5)
        tails = "\n".join(f"--- {n}:\n{self.components[n].log_tail(25)}" for n in names)
        raise ClusterStartError(f"timed out waiting for {what} (last: {last!r})\n{tails}")

    def _start_node(self) -> None:
        deadline = time.monotonic() + self.node_timeout
        self._write_node_files()
        self.kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": bootstrap_manifests()[:3]}),
            check=True,
        )
        self._spawn_node("containerd", self._node_argv()["containerd"])
        self._wait(
            "containerd",
            lambda: _run([*self.ctr, "version"], check=False).returncode == 0,
            deadline,
            ["containerd"],
        )
        # Leftovers of an earlier run in the kept image store: no sandbox survives a node restart.
        self.crictl("rmp", "--all", "--force")
        ensure_binary_image(PAUSE_IMAGE, self.node_bin / "pause", "/pause")
        ensure_binary_image(COREDNS_IMAGE, self.node_bin / "coredns", "/coredns")
        self.load_images([PAUSE_IMAGE, COREDNS_IMAGE, *self.images])
        ensure_cgroup_root(CGROUP_ROOT)
        self._spawn_node("kubelet", self._node_argv()["kubelet"])
        self._wait(
            "node registration",
            lambda: self.kubectl("get", "node", NODE_NAME).returncode == 0,
            deadline,
            ["containerd", "kubelet"],
        )
        self.kubectl(
            "patch",
            "node",
            NODE_NAME,
            "--type=merge",
            "-p",
            json.dumps({"spec": {"podCIDR": POD_CIDR, "podCIDRs": [POD_CIDR]}}),
            check=True,
        )
        self._spawn_node("kube-proxy", self._node_argv()["kube-proxy"])
        self._spawn_node("kube-router", self._node_argv()["kube-router"])
        self._wait(
            "node Ready",
            lambda: not self._not_ready_nodes([NODE_NAME]),
            deadline,
            ["containerd", "kubelet", "kube-proxy", "kube-router"],
        )
        self.kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": bootstrap_manifests()[3:]}),
            check=True,
        )
        self._wait(
            "CoreDNS available",
            lambda: (
                self.kubectl(
                    "rollout", "status", "deployment/coredns", "-n", "kube-system", "--timeout=5s"
                ).returncode
                == 0
            ),
            deadline,
            ["containerd", "kubelet", "kube-proxy", "kube-router"],
        )

    def stop(self) -> None:
        with self._lock:
            if not self._node_stopped:
                self._node_stopped = True
                self._stop_node()
        super().stop()

    def _stop_node(self) -> None:
        comps = self.components
        if "kubelet" in comps and comps["kubelet"].proc is not None:
            _stop_group(comps["kubelet"].proc.pid, timeout=10)
        if "containerd" in comps and comps["containerd"].running():
            with contextlib.suppress(Exception):
                self.crictl("rmp", "--all", "--force", timeout=90)
        for name in ("kube-router", "kube-proxy", "containerd"):
            if name in comps and comps[name].proc is not None:
                _stop_group(comps[name].proc.pid, timeout=10)
        if not self._owns_machine:
            return
        kill_cgroup(CGROUP_ROOT)
        unmount_under([self.node_dir, self.containerd_root])
        network_down()
        with contextlib.suppress(OSError):
            _Owner.path.unlink()
        self._owns_machine = False


__all__ = [
    "CLUSTER_CIDR",
    "DNS_IP",
    "NODE_IP",
    "NODE_NAME",
    "POD_CIDR",
    "SIMULATED_TAINT",
    "NodeUnavailable",
    "RealNodeCluster",
    "ensure_node_binaries",
    "node_prerequisites",
]


# --------------------------------------------------------------------------------------------------
# command line: a detached cluster with the real node, to look around or run a test by hand


def _state_dir() -> Path:
    return cache_dir() / "real-node-cluster"


def _default_images() -> list[str]:
    import yaml

    chart = REPO_ROOT / "charts" / "berth"
    values = yaml.safe_load((chart / "values.yaml").read_text())
    app = yaml.safe_load((chart / "Chart.yaml").read_text())["appVersion"]
    return [f"{i['repository']}:{i['tag'] or app}" for i in (values["image"], values["server"]["cpuImage"])]


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="realnode.py", description="the local control plane plus a real node"
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start it detached (state in $BERTH_CACHE/real-node-cluster), print env")
    up.add_argument(
        "--image",
        action="append",
        help="Docker image to load (default: the chart's operator and server-cpu images); repeatable",
    )
    sub.add_parser("down", help="stop it and remove its directory")
    sub.add_parser("env", help="print export lines for KUBECONFIG and PATH (kubectl, helm, crictl)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    state = _state_dir() / "state.json"
    if args.cmd == "down":
        rec = _Owner.read()
        if rec is not None:
            sweep_stale_node(rec)
        shutil.rmtree(_state_dir(), ignore_errors=True)
        print("real-node cluster stopped", file=sys.stderr)
        return 0
    if args.cmd == "up":
        rec = _Owner.read()
        if rec is not None and _Owner.alive(rec):
            print(f"a real node already runs ({rec.get('workdir')}); `down` first", file=sys.stderr)
            return 1
        cluster = RealNodeCluster(images=args.image or _default_images(), workdir=_state_dir(), detach=True)
        cluster.start()
        print(
            f"up: {cluster.server}, node {NODE_NAME} ({NODE_IP}), logs in {cluster.logs_dir}", file=sys.stderr
        )
    if not state.exists():
        print("no real-node cluster running; `up` starts one", file=sys.stderr)
        return 1
    data = json.loads(state.read_text())
    print(f"export KUBECONFIG={data['kubeconfig']}")
    print(f"export PATH={data['bin_dir']}:{node_bin_dir()}:$PATH")
    print(
        f"export CONTAINER_RUNTIME_ENDPOINT=unix://{Path(data['workdir']) / 'node' / 'run' / 'containerd.sock'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
