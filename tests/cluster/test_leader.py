"""Two real `berth operator` processes (the chart's RBAC): the loops run in exactly one of them, the
holder of the leader Lease; killing it moves them to the other within the lease duration."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .conftest import wait_for
from .operator_proc import OPERATOR_NAMESPACE, OperatorProcess

LEASE_SECONDS = 4.0
LEASE = "berth-operator"  # the chart's: its Role grants get/patch on that Lease name only


def _leader(op: OperatorProcess) -> float | None:
    try:
        return op.metrics().get("berth_operator_leader{}")
    except OSError:
        return None


def _holder(cluster: Any) -> str | None:
    r = cluster.kubectl("get", "lease", LEASE, "-n", OPERATOR_NAMESPACE, "-o", "json")
    return json.loads(r.stdout)["spec"].get("holderIdentity") if r.returncode == 0 else None


def test_one_leader_and_failover_within_the_lease(cluster: Any, tmp_path: Path) -> None:
    env = {
        "BERTH_LEADER_ELECTION_LEASE_SECONDS": str(LEASE_SECONDS),
        "BERTH_LEADER_ELECTION_LEASE_NAME": LEASE,
    }
    ops = [OperatorProcess(cluster, tmp_path / name, {**env, "POD_NAME": name}) for name in ("op-a", "op-b")]
    for op in ops:
        op.install()  # the chart's RBAC (applied again: unchanged) and this process's token kubeconfig
        op.start()
    try:
        wait_for(lambda: {_leader(op) for op in ops} == {0.0, 1.0}, timeout=60, message="one leader of two")
        time.sleep(LEASE_SECONDS * 2)  # and it stays that way: renewals keep it, the other waits
        states = [_leader(op) for op in ops]
        assert sorted(states) == [0.0, 1.0], states
        first = ops[states.index(1.0)]
        other = ops[1 - states.index(1.0)]
        assert _holder(cluster) == ("op-a" if first is ops[0] else "op-b")

        first.kill()  # SIGKILL: no hand-over, the Lease must lapse
        killed = time.monotonic()
        wait_for(lambda: _leader(other) == 1.0, timeout=LEASE_SECONDS * 4, message="failover")
        took = time.monotonic() - killed
        assert took <= LEASE_SECONDS + 4 * LEASE_SECONDS / 5 + 2, took  # lease + a retry or so + scrape
        assert _holder(cluster) == ("op-b" if other is ops[1] else "op-a")
    except Exception:
        for op in ops:
            print(op.log_tail())
        raise
    finally:
        for op in ops:
            op.stop()
