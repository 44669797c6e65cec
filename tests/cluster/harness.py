"""A real, local Kubernetes control plane for tests: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and kwok (simulated nodes and pods), all on loopback.

Library use (pytest fixtures in tests/cluster/conftest.py wrap this)::

    with LocalCluster() as c:
        c.kubectl("get", "nodes")
        c.add_gpu_node("gpu-3", gpus=8)

Command line (the Makefile's cluster-up / cluster-down)::

    python tests/cluster/harness.py up      # start detached, print `export KUBECONFIG=...`
    python tests/cluster/harness.py env     # print `export KUBECONFIG=...` of the running cluster
    python tests/cluster/harness.py down    # stop it and remove its directory
    python tests/cluster/harness.py build   # build the binaries (tools/cluster/build.sh)

The binaries come from tools/cluster/build.sh (see docs/cluster.md). This module only needs the
standard library and `cryptography`; `kubernetes` is imported lazily by `api_client()`.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import collections
import contextlib
import ctypes
import datetime as dt
import hashlib
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
TOOLS_DIR = REPO_ROOT / "tools" / "cluster"
BUILD_SCRIPT = TOOLS_DIR / "build.sh"
K8S_VERSION = "v1.37.2"  # keep in step with tools/cluster/build.sh
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kwok", "helm")

KWOK_ANNOTATION = "kwok.x-k8s.io/node"
WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})
SERVICE_CIDR = "10.96.0.0/16"
# Pod IPs are on loopback so that a test can run a real server on a simulated pod's IP (Linux
# routes all of 127.0.0.0/8 to lo). The API accepts loopback pod IPs, but EndpointSlice/Endpoints
# validation rejects them: nodes that must publish endpoints get a routable `pod_cidr` of their own
# (NodeSpec.pod_cidr; kwok allocates from the node's spec.podCIDR when it is set).
POD_CIDR = "127.244.0.0/16"
CONTEXT_NAME = "berth-local"
ADVERTISE_ADDRESS = "192.0.2.1"
ADMIN_USER = "berth-admin"

AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  # every write at Metadata level, so tests can count them per user (audit_writes)
  - level: Metadata
    verbs: ["create", "update", "patch", "delete", "deletecollection"]
  - level: None
"""


# --------------------------------------------------------------------------------------------------
# binaries


def cache_dir() -> Path:
    return Path(os.environ.get("BERTH_CACHE") or Path.home() / ".cache" / "berth")


def mod_hash(tools_dir: Path = TOOLS_DIR) -> str:
    """sha256 over the sorted go.mod/go.sum files, exactly as tools/cluster/build.sh computes it."""
    h = hashlib.sha256()
    files = sorted(
        [p.relative_to(tools_dir).as_posix() for p in tools_dir.glob("*/go.mod")]
        + [p.relative_to(tools_dir).as_posix() for p in tools_dir.glob("*/go.sum")]
    )
    for rel in files:
        h.update(rel.encode() + b"\0")
        h.update((tools_dir / rel).read_bytes())
    return h.hexdigest()[:12]


def default_bin_dir() -> Path:
    """Where build.sh puts (or has put) the binaries; BERTH_CLUSTER_BIN overrides it."""
    override = os.environ.get("BERTH_CLUSTER_BIN")
    if override:
        return Path(override)
    return cache_dir() / "cluster-bin" / f"{K8S_VERSION}-{mod_hash()}"


def binaries_present(bin_dir: Path) -> bool:
    return (bin_dir / "kwok-stages.yaml").is_file() and all(os.access(bin_dir / b, os.X_OK) for b in BINARIES)


def ensure_binaries(build: bool = True, stream: IO[str] | None = None) -> Path:
    """Return the binary directory, running tools/cluster/build.sh first when something is missing."""
    bin_dir = default_bin_dir()
    if binaries_present(bin_dir):
        return bin_dir
    if not build or os.environ.get("BERTH_CLUSTER_BIN"):
        raise FileNotFoundError(
            f"cluster binaries missing in {bin_dir}; run `make cluster-bin` (tools/cluster/build.sh)"
        )
    log.info("building cluster binaries with %s (long on a small machine)", BUILD_SCRIPT)
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT)],
        stdout=subprocess.PIPE,
        stderr=stream if stream is not None else None,
        text=True,
        check=True,
    )
    built = Path(proc.stdout.strip().splitlines()[-1])
    if not binaries_present(built):
        raise FileNotFoundError(f"build.sh finished but {built} is incomplete")
    return built


# --------------------------------------------------------------------------------------------------
# certificates


@dataclass
class Pki:
    dir: Path
    ca_cert: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    sa_key: Path
    sa_pub: Path
    clients: dict[str, tuple[Path, Path]] = field(default_factory=dict)


def _write_private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


def make_pki(
    directory: Path,
    clients: Mapping[str, tuple[str, Sequence[str]]],
    serving_ips: Sequence[str] = (),
) -> Pki:
    """A CA, a serving cert for kube-apiserver (loopback + in-cluster names + `serving_ips`), client
    certs (name -> (CN, groups)) and an RSA service-account signing key pair."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    until = now + dt.timedelta(days=2)

    def pem_key(key: Any) -> bytes:
        return key.private_bytes(  # type: ignore[no-any-return]
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "berth-test-ca")])
    usages = (
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
        "encipher_only",
        "decipher_only",
    )

    def builder(subject: x509.Name, public_key: Any, ca: bool, *usage: str) -> x509.CertificateBuilder:
        """A certificate signed by the test CA: validity, basic constraints and the key usages named."""
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(until)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(**{u: u in usage for u in usages}), critical=True)
        )

    ca_cert = (
        builder(ca_name, ca_key.public_key(), True, "digital_signature", "key_cert_sign", "crl_sign")
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, orgs: Sequence[str], server: bool) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
        b = (
            builder(x509.Name(attrs), key.public_key(), False, "digital_signature", "key_encipherment")
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH] if server else [ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        )
        if server:
            service_ip = ipaddress.IPv4Network(SERVICE_CIDR)[1]
            b = b.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.DNSName("kubernetes"),
                        x509.DNSName("kubernetes.default"),
                        x509.DNSName("kubernetes.default.svc"),
                        x509.DNSName("kubernetes.default.svc.cluster.local"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                        x509.IPAddress(service_ip),
                        *(x509.IPAddress(ipaddress.ip_address(ip)) for ip in serving_ips),
                    ]
                ),
                critical=False,
            )
        cert = b.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), pem_key(key)

    pki = Pki(
        dir=directory,
        ca_cert=directory / "ca.crt",
        ca_key=directory / "ca.key",
        serving_cert=directory / "apiserver.crt",
        serving_key=directory / "apiserver.key",
        sa_key=directory / "sa.key",
        sa_pub=directory / "sa.pub",
    )
    pki.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(pki.ca_key, pem_key(ca_key))
    crt, key = leaf("kube-apiserver", [], server=True)
    pki.serving_cert.write_bytes(crt)
    _write_private(pki.serving_key, key)
    for name, (cn, groups) in clients.items():
        crt, key = leaf(cn, groups, server=False)
        (directory / f"{name}.crt").write_bytes(crt)
        _write_private(directory / f"{name}.key", key)
        pki.clients[name] = (directory / f"{name}.crt", directory / f"{name}.key")
    sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write_private(pki.sa_key, pem_key(sa))
    pki.sa_pub.write_bytes(
        sa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return pki


def write_kubeconfig(path: Path, server: str, ca: Path, cert: Path, key: Path, user: str) -> Path:
    """A self-contained kubeconfig (data embedded), context `berth-local`. JSON is valid YAML."""

    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": CONTEXT_NAME, "cluster": {"server": server, "certificate-authority-data": b64(ca)}}
        ],
        "users": [
            {"name": user, "user": {"client-certificate-data": b64(cert), "client-key-data": b64(key)}}
        ],
        "contexts": [{"name": CONTEXT_NAME, "context": {"cluster": CONTEXT_NAME, "user": user}}],
        "current-context": CONTEXT_NAME,
        "preferences": {},
    }
    path.write_text(json.dumps(cfg, indent=2))
    path.chmod(0o600)
    return path


# --------------------------------------------------------------------------------------------------
# processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Component:
    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _stop_group(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM the process group led by pid, SIGKILL it after timeout."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class ClusterStartError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------------
# the cluster


@dataclass(frozen=True)
class NodeSpec:
    name: str
    gpus: int = 0
    cpu: str = "32"
    memory: str = "256Gi"
    ephemeral_storage: str = "1Ti"  # hf:// download containers request their cache size of it
    pods: int = 110
    labels: Mapping[str, str] = field(default_factory=dict)
    gpu_resource: str = "nvidia.com/gpu"
    pod_cidr: str | None = None  # kwok takes pod IPs from here instead of the cluster's pod CIDR
    taints: tuple[Mapping[str, str], ...] = ()


DEFAULT_NODES: tuple[NodeSpec, ...] = (
    NodeSpec("kwok-gpu-0", gpus=4),
    NodeSpec("kwok-gpu-1", gpus=4),
    NodeSpec("kwok-cpu-0", gpus=0, cpu="16", memory="64Gi"),
)


def node_manifest(spec: NodeSpec) -> dict[str, Any]:
    capacity: dict[str, str] = {
        "cpu": spec.cpu,
        "memory": spec.memory,
        "ephemeral-storage": spec.ephemeral_storage,
        "pods": str(spec.pods),
    }
    labels = {
        "kubernetes.io/hostname": spec.name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "type": "kwok",
        **spec.labels,
    }
    if spec.gpus:
        capacity[spec.gpu_resource] = str(spec.gpus)
        labels.setdefault("nvidia.com/gpu.present", "true")
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": spec.name, "annotations": {KWOK_ANNOTATION: "fake"}, "labels": labels},
        "spec": {
            **({"podCIDR": spec.pod_cidr, "podCIDRs": [spec.pod_cidr]} if spec.pod_cidr else {}),
            **({"taints": [dict(t) for t in spec.taints]} if spec.taints else {}),
        },
        "status": {"capacity": capacity, "allocatable": dict(capacity)},
    }


class LocalCluster:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler + kwok on loopback.

    Use as a context manager (or call start()/stop()). Everything lives in one temporary directory
    (certificates, etcd data, logs, kubeconfig, audit log) that stop() removes, unless `keep=True`
    or BERTH_CLUSTER_KEEP=1. Processes run in their own process groups; stop() is registered with
    atexit and, when started from the main thread, the children get SIGKILL if this process dies.
    `detach=True` (the CLI's `up`) leaves the processes running after this process exits and
    records them in <workdir>/state.json for `down`.
    """

    kind = "local"
    # Where kube-apiserver listens and what it advertises (the `kubernetes` Service's endpoint).
    # A subclass with real nodes (tests/cluster/realnode.py) moves both to an address its pods reach.
    bind_address = "127.0.0.1"
    advertise_address = ADVERTISE_ADDRESS

    def __init__(
        self,
        bin_dir: Path | None = None,
        workdir: Path | None = None,
        nodes: Iterable[NodeSpec] = DEFAULT_NODES,
        keep: bool | None = None,
        detach: bool = False,
        start_timeout: float = 90.0,
        verbosity: int = 1,
        pod_cidr: str = POD_CIDR,
    ) -> None:
        self.pod_cidr = pod_cidr
        self.bin_dir = Path(bin_dir) if bin_dir else ensure_binaries(build=False)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="berth-cluster-"))
        self.nodes = list(nodes)
        self.keep = keep if keep is not None else os.environ.get("BERTH_CLUSTER_KEEP") == "1"
        self.detach = detach
        self.start_timeout = start_timeout
        self.verbosity = verbosity
        self.logs_dir = self.workdir / "logs"
        self.kubeconfig = self.workdir / "kubeconfig"
        self.audit_log = self.workdir / "audit.log"
        self.ports: dict[str, int] = {}
        self.components: dict[str, Component] = {}
        self.pki: Pki | None = None
        self.startup_seconds: float | None = None
        self._lock = threading.RLock()
        self._stopped = False
        self._atexit_registered = False

    # ---- lifecycle ------------------------------------------------------------------------------

    @property
    def server(self) -> str:
        return f"https://{self.bind_address}:{self.ports['apiserver']}"

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> LocalCluster:
        t0 = time.monotonic()
        if not self.detach and not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        try:
            self._prepare()
            self._start_etcd()
            self._start_apiserver()
            self._wait_apiserver(t0 + self.start_timeout)
            for name in ("kube-controller-manager", "kube-scheduler", "kwok"):
                self._spawn(name)
            for spec in self.nodes:
                self.apply_node(spec, wait=False)
            self._wait_ready(t0 + self.start_timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        log.info("local cluster up in %.1fs at %s (dir %s)", self.startup_seconds, self.server, self.workdir)
        if self.detach:
            self._write_state()
        return self

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            # reverse start order: kwok and controllers first, etcd last
            for comp in reversed(list(self.components.values())):
                if comp.proc is not None:
                    _stop_group(comp.proc.pid)
                    with contextlib.suppress(Exception):
                        comp.proc.wait(timeout=5)
            if self.keep:
                log.warning("keeping cluster directory %s", self.workdir)
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)

    # ---- setup ----------------------------------------------------------------------------------

    def _prepare(self) -> None:
        if self._own_workdir:
            sweep_stale_workdirs()
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "owner.pid").write_text(str(os.getpid()))
        self.logs_dir.mkdir(exist_ok=True)
        for name in ("etcd", "etcd-peer", "apiserver", "kcm", "scheduler", "kwok"):
            self.ports[name] = free_port()
        clients = self._pki_clients()
        self.pki = make_pki(
            self.workdir / "pki",
            clients,
            serving_ips=[self.bind_address] if self.bind_address != "127.0.0.1" else [],
        )
        for name in clients:
            crt, key = self.pki.clients[name]
            path = self.kubeconfig if name == "admin" else self.workdir / f"{name}.kubeconfig"
            write_kubeconfig(path, self.server, self.pki.ca_cert, crt, key, user=name)
        (self.workdir / "audit-policy.yaml").write_text(AUDIT_POLICY)
        self._define_components()

    def _pki_clients(self) -> dict[str, tuple[str, list[str]]]:
        """Client certificates to make: name -> (CN, groups); each gets <name>.kubeconfig (admin: kubeconfig)."""
        return {
            "admin": (ADMIN_USER, ["system:masters"]),
            "kcm": ("system:kube-controller-manager", []),
            "scheduler": ("system:kube-scheduler", []),
            "kwok": ("kwok-controller", ["system:masters"]),
        }

    def _apiserver_extra_args(self) -> list[str]:
        return []

    def _define_components(self) -> None:
        assert self.pki is not None
        b, w, p, v = self.bin_dir, self.workdir, self.pki, str(self.verbosity)
        etcd_url = f"http://127.0.0.1:{self.ports['etcd']}"
        peer_url = f"http://127.0.0.1:{self.ports['etcd-peer']}"
        argv: dict[str, list[str]] = {
            "etcd": [
                str(b / "etcd"),
                "--name=berth",
                f"--data-dir={w / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=berth={peer_url}",
                "--unsafe-no-fsync=true",  # test data: durability is not wanted, speed is
                "--log-level=warn",
            ],
            "kube-apiserver": [
                str(b / "kube-apiserver"),
                f"--etcd-servers={etcd_url}",
                f"--bind-address={self.bind_address}",
                # a loopback address is refused by the endpoint reconciler; advertise a documentation
                # address (TEST-NET-1) so the `kubernetes` Service still gets its EndpointSlice
                f"--advertise-address={self.advertise_address}",
                f"--secure-port={self.ports['apiserver']}",
                f"--cert-dir={w / 'apiserver-certs'}",
                f"--tls-cert-file={p.serving_cert}",
                f"--tls-private-key-file={p.serving_key}",
                f"--client-ca-file={p.ca_cert}",
                "--authorization-mode=Node,RBAC",
                "--allow-privileged=true",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={p.sa_pub}",
                f"--service-account-signing-key-file={p.sa_key}",
                f"--audit-policy-file={w / 'audit-policy.yaml'}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-mode=blocking",
                "--profiling=false",
                *self._apiserver_extra_args(),
                f"--v={v}",
            ],
            "kube-controller-manager": [
                str(b / "kube-controller-manager"),
                f"--kubeconfig={w / 'kcm.kubeconfig'}",
                f"--authentication-kubeconfig={w / 'kcm.kubeconfig'}",
                f"--authorization-kubeconfig={w / 'kcm.kubeconfig'}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.ports['kcm']}",
                f"--cert-dir={w / 'kcm-certs'}",
                "--leader-elect=false",
                "--controllers=*",  # every default controller: deployment, replicaset, garbage
                # collector, HPA, endpoints/endpointslice, namespace, serviceaccount(-token), ...
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={p.sa_key}",
                f"--root-ca-file={p.ca_cert}",
                f"--cluster-signing-cert-file={p.ca_cert}",
                f"--cluster-signing-key-file={p.ca_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--concurrent-deployment-syncs=10",
                "--concurrent-replicaset-syncs=10",
                "--concurrent-gc-syncs=20",
                f"--v={v}",
            ],
            "kube-scheduler": [
                str(b / "kube-scheduler"),
                f"--kubeconfig={w / 'scheduler.kubeconfig'}",
                f"--authentication-kubeconfig={w / 'scheduler.kubeconfig'}",
                f"--authorization-kubeconfig={w / 'scheduler.kubeconfig'}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.ports['scheduler']}",
                f"--cert-dir={w / 'scheduler-certs'}",
                "--leader-elect=false",
                f"--v={v}",
            ],
            "kwok": [
                str(b / "kwok"),
                f"--kubeconfig={w / 'kwok.kubeconfig'}",
                f"--config={b / 'kwok-stages.yaml'}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fake",
                f"--cidr={self.pod_cidr}",
                "--node-ip=10.240.0.1",
                f"--server-address=127.0.0.1:{self.ports['kwok']}",
                "--node-lease-duration-seconds=40",
            ],
        }
        self.components = {
            name: Component(name, args, self.logs_dir / f"{name}.log") for name, args in argv.items()
        }

    def _spawn(self, name: str) -> Component:
        comp = self.components[name]
        logf = comp.log_path.open("ab")
        attach = not self.detach and threading.current_thread() is threading.main_thread()
        comp.proc = subprocess.Popen(
            comp.argv,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,
            preexec_fn=_die_with_parent if attach else None,
            env={**os.environ, "HOME": str(self.workdir)},  # kwok reads ~/.kwok; keep it ours
        )
        logf.close()
        log.debug("started %s pid %d", name, comp.proc.pid)
        return comp

    def _start_etcd(self) -> None:
        self._spawn("etcd")

    def _start_apiserver(self) -> None:
        self._spawn("kube-apiserver")

    # ---- waiting --------------------------------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext:
        assert self.pki is not None
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        crt, key = self.pki.clients["admin"]
        ctx.load_cert_chain(str(crt), str(key))
        return ctx

    def _get(self, url: str, ctx: ssl.SSLContext | None = None, timeout: float = 2.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, context=ctx, timeout=timeout) as r:
                return int(r.status), r.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return int(e.code), e.read().decode(errors="replace")
        except (OSError, urllib.error.URLError) as e:
            return 0, str(e)

    def _check_alive(self, names: Iterable[str]) -> None:
        for n in names:
            comp = self.components[n]
            if comp.proc is not None and comp.proc.poll() is not None:
                raise ClusterStartError(
                    f"{n} exited with code {comp.proc.returncode}; last log lines "
                    f"({comp.log_path}):\n{comp.log_tail()}"
                )

    def _wait_apiserver(self, deadline: float) -> None:
        ctx = self._ssl_context()
        last = ""
        while time.monotonic() < deadline:
            self._check_alive(["etcd", "kube-apiserver"])
            code, body = self._get(f"{self.server}/readyz", ctx)
            if code == 200:
                return
            last = f"{code} {body[-500:]}"
            time.sleep(0.2)
        raise ClusterStartError(
            f"kube-apiserver not ready: {last}\n{self.components['kube-apiserver'].log_tail()}"
        )

    def _wait_ready(self, deadline: float) -> None:
        """Usable: controllers and scheduler healthy, every node Ready (kwok), and the
        serviceaccount controller has made the `default` ServiceAccount."""
        pending = {"kcm", "scheduler", "nodes", "serviceaccount"}
        last = ""
        while time.monotonic() < deadline:
            self._check_alive(self.components)
            if (
                "kcm" in pending
                and self._get(f"https://127.0.0.1:{self.ports['kcm']}/healthz", _insecure())[0] == 200
            ):
                pending.discard("kcm")
            if (
                "scheduler" in pending
                and self._get(f"https://127.0.0.1:{self.ports['scheduler']}/healthz", _insecure())[0] == 200
            ):
                pending.discard("scheduler")
            if "nodes" in pending:
                not_ready = self._not_ready_nodes([n.name for n in self.nodes])
                if not not_ready:
                    pending.discard("nodes")
                last = f"nodes not ready: {not_ready}"
            if (
                "serviceaccount" in pending
                and self.kubectl("get", "serviceaccount", "default", "-n", "default").returncode == 0
            ):
                pending.discard("serviceaccount")
            if not pending:
                return
            time.sleep(0.25)
        raise ClusterStartError(f"cluster not ready, waiting for {sorted(pending)} ({last})")

    def _not_ready_nodes(self, names: Sequence[str]) -> list[str]:
        if not names:
            return []
        r = self.kubectl("get", "nodes", "-o", "json")
        if r.returncode != 0:
            return list(names)
        ready = {
            item["metadata"]["name"]
            for item in json.loads(r.stdout)["items"]
            if any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in item.get("status", {}).get("conditions", [])
            )
        }
        return [n for n in names if n not in ready]

    def wait_nodes_ready(self, names: Sequence[str], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._not_ready_nodes(names):
                return
            time.sleep(0.2)
        raise TimeoutError(f"nodes not Ready after {timeout}s: {self._not_ready_nodes(names)}")

    # ---- API for tests --------------------------------------------------------------------------

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = False, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run the built kubectl against this cluster as the admin (system:masters)."""
        return run_kubectl(
            self.bin_dir,
            self.kubeconfig,
            args,
            input=input,
            check=check,
            timeout=timeout,
            cache_dir=self.workdir / "kube-cache",
        )

    def api_client(self) -> Any:
        """A kubernetes.client.ApiClient for the admin user."""
        return make_api_client(self.kubeconfig)

    def apply_node(self, spec: NodeSpec, wait: bool = True, timeout: float = 30.0) -> None:
        self.kubectl("apply", "-f", "-", input=json.dumps(node_manifest(spec)), check=True)
        if spec not in self.nodes:
            self.nodes.append(spec)
        if wait:
            self.wait_nodes_ready([spec.name], timeout=timeout)

    def add_gpu_node(
        self, name: str, gpus: int = 4, cpu: str = "32", memory: str = "256Gi", wait: bool = True
    ) -> NodeSpec:
        """Create another simulated GPU node (kwok makes it Ready) and wait until it is Ready."""
        spec = NodeSpec(name, gpus=gpus, cpu=cpu, memory=memory)
        self.apply_node(spec, wait=wait)
        return spec

    def delete_node(self, name: str) -> None:
        self.kubectl("delete", "node", name, "--ignore-not-found", "--wait=true", check=True)
        self.nodes = [n for n in self.nodes if n.name != name]

    def stop_apiserver(self, grace: float = 5.0) -> None:
        """SIGTERM kube-apiserver, SIGKILL it after `grace` seconds. (A graceful stop lets open
        requests drain for up to 60 s here; the state is in etcd either way.)"""
        comp = self.components["kube-apiserver"]
        if comp.proc is not None:
            _stop_group(comp.proc.pid, timeout=grace)
            with contextlib.suppress(Exception):
                comp.proc.wait(timeout=5)

    def start_apiserver(self, timeout: float = 60.0) -> None:
        self._spawn("kube-apiserver")
        self._wait_apiserver(time.monotonic() + timeout)

    def restart_apiserver(self, downtime: float = 0.0, timeout: float = 60.0, grace: float = 5.0) -> None:
        """Stop kube-apiserver (SIGTERM, SIGKILL after `grace` s), wait `downtime` seconds, start it
        again on the same port with the same certificates, and wait until /readyz answers 200."""
        with self._lock:
            self.stop_apiserver(grace=grace)
            if downtime:
                time.sleep(downtime)
            self.start_apiserver(timeout=timeout)

    def audit_events(
        self,
        since: dt.datetime | float | None = None,
        verbs: Iterable[str] | None = WRITE_VERBS,
    ) -> list[dict[str, Any]]:
        """Audit events (ResponseComplete stage) received at or after `since` (a datetime or a
        time.time() value), only those with the given verbs (None: every verb that was logged)."""
        return read_audit_events(self.audit_log, since=since, verbs=verbs)

    def audit_writes(self, since: dt.datetime | float | None = None) -> collections.Counter[str]:
        """Number of write requests (create/update/patch/delete/deletecollection) per user since
        `since`. The user is the effective one: the impersonated user when impersonation was used."""
        return collections.Counter(effective_user(e) for e in self.audit_events(since))

    # ---- detached mode (CLI) --------------------------------------------------------------------

    def _write_state(self) -> None:
        state = {
            "workdir": str(self.workdir),
            "kubeconfig": str(self.kubeconfig),
            "bin_dir": str(self.bin_dir),
            "server": self.server,
            "pids": {n: c.pid for n, c in self.components.items()},
            "startup_seconds": self.startup_seconds,
        }
        (self.workdir / "state.json").write_text(json.dumps(state, indent=2))


def sweep_stale_workdirs() -> None:
    """Remove the directories of earlier clusters whose owning process is gone (killed with
    SIGKILL, so neither stop() nor atexit ran; its children died with it through PDEATHSIG)."""
    for d in Path(tempfile.gettempdir()).glob("berth-cluster-*"):
        try:
            pid = int((d / "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        if not _alive(pid):
            log.info("removing stale cluster directory %s (pid %d is gone)", d, pid)
            shutil.rmtree(d, ignore_errors=True)


def _insecure() -> ssl.SSLContext:
    """For the /healthz of kube-controller-manager and kube-scheduler, which serve a self-signed
    certificate of their own (readiness probe only, loopback)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def run_kubectl(
    bin_dir: Path,
    kubeconfig: Path,
    args: Sequence[str],
    input: str | None = None,
    check: bool = False,
    timeout: float = 120.0,
    cache_dir: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    cache = [f"--cache-dir={cache_dir}"] if cache_dir else []
    cmd = [str(bin_dir / "kubectl"), f"--kubeconfig={kubeconfig}", *cache, *args]
    r = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise subprocess.CalledProcessError(r.returncode, cmd, r.stdout, r.stderr)
    return r


def make_api_client(kubeconfig: Path, context: str | None = None) -> Any:
    from kubernetes import config  # imported here: the CLI and the harness need no client

    return config.new_client_from_config(config_file=str(kubeconfig), context=context)  # type: ignore[no-untyped-call]


def effective_user(event: Mapping[str, Any]) -> str:
    imp = event.get("impersonatedUser") or {}
    return str(imp.get("username") or event.get("user", {}).get("username", ""))


def _parse_ts(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def read_audit_events(
    path: Path,
    since: dt.datetime | float | None = None,
    verbs: Iterable[str] | None = WRITE_VERBS,
) -> list[dict[str, Any]]:
    if isinstance(since, (int, float)):
        since = dt.datetime.fromtimestamp(since, dt.UTC)
    elif since is not None and since.tzinfo is None:
        since = since.astimezone(dt.UTC)
    wanted = frozenset(verbs) if verbs is not None else None
    out: list[dict[str, Any]] = []
    try:
        text = path.read_text()
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:  # a line being written right now
            continue
        if ev.get("stage") != "ResponseComplete":
            continue
        if wanted is not None and ev.get("verb") not in wanted:
            continue
        if since is not None and _parse_ts(ev["requestReceivedTimestamp"]) < since:
            continue
        out.append(ev)
    return out


# --------------------------------------------------------------------------------------------------
# pytest options (used by tests/cluster/conftest.py; tests/conftest.py may call it too so that the
# options parse on a plain `pytest` run, where tests/cluster/conftest.py loads only after parsing)


def add_pytest_options(parser: Any) -> None:
    group = parser.getgroup("berth cluster")
    with contextlib.suppress(ValueError):  # already added by another conftest
        group.addoption(
            "--cluster",
            choices=("local", "kind"),
            default=os.environ.get("BERTH_TEST_CLUSTER", "local"),
            help="cluster for tests/cluster: local (built control plane + kwok, default) or kind (pytest-kind)",
        )
    with contextlib.suppress(ValueError):
        group.addoption(
            "--kubeconfig",
            default=os.environ.get("BERTH_TEST_KUBECONFIG"),
            help="use the existing cluster of this kubeconfig (its current context's name must contain "
            "kind, kwok, test, local or minikube)",
        )


def cluster_options(config: Any) -> tuple[str | None, str]:
    """(--kubeconfig, --cluster), with the environment defaults when the options are not registered."""
    kubeconfig = config.getoption("--kubeconfig", default=os.environ.get("BERTH_TEST_KUBECONFIG"))
    mode = config.getoption("--cluster", default=os.environ.get("BERTH_TEST_CLUSTER", "local"))
    return (str(kubeconfig) if kubeconfig else None), str(mode)


# --------------------------------------------------------------------------------------------------
# command line: up / down / env / build


def state_dir() -> Path:
    return cache_dir() / "local-cluster"


def _read_state() -> dict[str, Any] | None:
    try:
        return dict(json.loads((state_dir() / "state.json").read_text()))
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """Whether pid exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def cli_down() -> int:
    state = _read_state()
    if state is None:
        if state_dir().exists():
            shutil.rmtree(state_dir(), ignore_errors=True)
        print("no local cluster running", file=sys.stderr)
        return 0
    order = ["kwok", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"]
    for name in order:
        pid = state["pids"].get(name)
        if pid and _alive(pid):
            _stop_group(pid)
    shutil.rmtree(state["workdir"], ignore_errors=True)
    print("local cluster stopped", file=sys.stderr)
    return 0


def _print_env(state: Mapping[str, Any]) -> None:
    print(f"export KUBECONFIG={state['kubeconfig']}")
    print(f"export PATH={state['bin_dir']}:$PATH")


def cli_up(args: argparse.Namespace) -> int:
    state = _read_state()
    if state is not None and all(_alive(p) for p in state["pids"].values()):
        print(f"local cluster already running at {state['server']}", file=sys.stderr)
        _print_env(state)
        return 0
    if state is not None or state_dir().exists():
        cli_down()
    bin_dir = ensure_binaries(build=not args.no_build, stream=sys.stderr)
    cluster = LocalCluster(bin_dir=bin_dir, workdir=state_dir(), detach=True)
    cluster.start()
    print(
        f"local cluster up in {cluster.startup_seconds:.1f}s: {cluster.server}, logs in {cluster.logs_dir}",
        file=sys.stderr,
    )
    state = _read_state()
    assert state is not None
    _print_env(state)
    return 0


def cli_env() -> int:
    state = _read_state()
    if state is None:
        print("no local cluster running; `make cluster-up` starts one", file=sys.stderr)
        return 1
    _print_env(state)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="harness.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a detached local cluster (state in $BERTH_CACHE/local-cluster)")
    up.add_argument("--no-build", action="store_true", help="fail instead of building missing binaries")
    sub.add_parser("down", help="stop it and remove its directory")
    sub.add_parser("env", help="print export lines for KUBECONFIG and PATH")
    sub.add_parser("build", help="build the binaries (tools/cluster/build.sh) and print their directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    if args.cmd == "up":
        return cli_up(args)
    if args.cmd == "down":
        return cli_down()
    if args.cmd == "env":
        return cli_env()
    print(ensure_binaries(build=True, stream=sys.stderr))
    return 0


if __name__ == "__main__":
    sys.exit(main())
