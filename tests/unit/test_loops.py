"""The operator-wide loops: one pass handles every live ModelDeployment; only the peering leader acts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from berth.controller.loops import Loop, is_leader

from .conftest import RecordingKube, md_body

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def test_once_handles_every_live_object_and_survives_a_failure(recording: RecordingKube) -> None:
    for name in ("a", "b", "c"):
        recording.objects[("ModelDeployment", "ns1", name)] = md_body(name=name, namespace="ns1")
    gone = md_body(name="d", namespace="ns1", deletionTimestamp="2026-11-23T11:00:00Z")
    recording.objects[("ModelDeployment", "ns1", "d")] = gone
    seen: list[str] = []

    def handle(body: dict[str, Any]) -> None:
        seen.append(body["metadata"]["name"])
        if body["metadata"]["name"] == "a":
            raise RuntimeError("boom")

    assert Loop("resync", 1, recording, ["ns1"], handle).once() == 3
    assert seen == ["a", "b", "c"]


def _peering(recording: RecordingKube, peers: dict[str, dict[str, Any]]) -> None:
    recording.objects[("ClusterKopfPeering", "", "berth")] = {"metadata": {"name": "berth"}, "status": peers}


def test_leader_is_the_highest_live_priority(recording: RecordingKube) -> None:
    assert is_leader(recording, "", [], 5, NOW)  # standalone
    fresh = (NOW - timedelta(seconds=10)).isoformat()
    stale = (NOW - timedelta(seconds=600)).isoformat()
    _peering(
        recording,
        {
            "me": {"priority": 5, "lastseen": fresh, "lifetime": 60},
            "other": {"priority": 9, "lastseen": fresh, "lifetime": 60},
        },
    )
    assert not is_leader(recording, "berth", [], 5, NOW)
    assert is_leader(recording, "berth", [], 9, NOW)
    _peering(
        recording,
        {
            "me": {"priority": 5, "lastseen": fresh, "lifetime": 60},
            "other": {"priority": 9, "lastseen": stale, "lifetime": 60},
        },
    )
    assert is_leader(recording, "berth", [], 5, NOW)  # the higher one is dead
