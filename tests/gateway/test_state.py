"""The gateway's pure parts: conversion from Kubernetes objects, quotas' windows, usage deltas, balancing."""

from __future__ import annotations

from datetime import UTC, datetime

from berth.gateway.balancer import Balancer
from berth.gateway.convert import endpoints_of, instance_of, key_of
from berth.gateway.quota import Quotas, share
from berth.gateway.registry import Endpoint, Instance, Key, Limits, Registry, hash_key
from berth.gateway.usage import Delta, UsageBook


def test_instance_of_a_model_deployment() -> None:
    md = {
        "metadata": {"namespace": "ns", "name": "chat"},
        "spec": {
            "model": {
                "uri": "builtin://x",
                "servedName": "smol",
                "adapters": [{"name": "sql", "uri": "pvc://a/b"}],
            },
            "capacity": 0,
            "autoscaling": {"enabled": True, "minCapacity": 2, "wakeTimeoutSeconds": 30},
        },
    }
    inst = instance_of(md)
    assert inst == Instance("ns", "chat", "smol", ("sql",), 0, True, 2, 30.0)
    assert inst.serves("smol") and inst.serves("smol:sql") and not inst.serves("smol:other")
    assert instance_of({"metadata": {"namespace": "ns", "name": "x"}, "spec": {}}).served_name == "x"


def test_endpoints_of_a_slice_keeps_ready_ones_only() -> None:
    eps = endpoints_of(
        {
            "ports": [{"name": "metrics", "port": 9000}, {"name": "http", "port": 8000}],
            "endpoints": [
                {"addresses": ["10.0.0.1"], "conditions": {"ready": True}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": False}},
                {"addresses": ["10.0.0.3"]},
            ],
        }
    )
    assert eps == (Endpoint("10.0.0.1", 8000), Endpoint("10.0.0.3", 8000))
    assert Endpoint("fd00::1", 80).url == "http://[fd00::1]:80"
    assert endpoints_of({"ports": [], "endpoints": [{"addresses": ["10.0.0.1"]}]}) == ()


def test_key_of_an_api_key() -> None:
    key = key_of(
        {
            "metadata": {"namespace": "ns", "name": "ci"},
            "spec": {
                "models": ["chat"],
                "limits": {"requestsPerMinute": 10},
                "expiresAt": "2030-01-01T00:00:00Z",
            },
            "status": {"keyId": "ak-1", "keyHash": "ab"},
        }
    )
    assert key.limits == Limits(10, 1_000_000, 32) and key.models == ("chat",) and key.key_id == "ak-1"
    assert key.active(datetime(2029, 1, 1, tzinfo=UTC)) and not key.active(datetime(2031, 1, 1, tzinfo=UTC))


def test_a_key_without_a_published_hash_opens_nothing() -> None:
    reg = Registry()
    reg.put_key(Key("ns", "ci", "ak", ""))
    assert reg.authenticate("") is None and reg.authenticate("anything") is None
    reg.put_key(Key("ns", "ci", "ak", hash_key("k")))
    assert reg.authenticate("k") is not None
    reg.put_key(Key("ns", "ci", "ak", hash_key("rotated")))
    assert reg.authenticate("k") is None and reg.authenticate("rotated") is not None


def test_quotas_slide_and_share_per_replica() -> None:
    now = [1000.0]
    q = Quotas(replicas=2, clock=lambda: now[0])
    key = Key("ns", "ci", "ak", "h", limits=Limits(requests_per_minute=4, tokens_per_minute=100))
    assert share(4, 2) == 2 and share(1, 3) == 1 and share(None, 2) is None
    assert q.admit(key) is None
    q.finish("ak", 10)
    now[0] += 20
    assert q.admit(key) is None
    q.finish("ak", 10)
    refusal = q.admit(key)
    assert refusal is not None and refusal.limit == "requests_per_minute" and refusal.retry_after == 40
    now[0] += 41
    assert q.admit(key) is None  # the request at t=1000 left the window
    q.finish("ak", 0)
    tpm = Key("ns", "batch", "ak-t", "h2", limits=Limits(tokens_per_minute=100))
    for spent in (10, 60):  # 70 of the replica's 50 tokens in the window
        assert q.admit(tpm) is None
        q.finish("ak-t", spent)
        now[0] += 10
    refusal = q.admit(tpm)
    assert refusal is not None and refusal.limit == "tokens_per_minute"
    # dropping the 10 spent at t=1061 leaves 60, still not under 50: both must go, at 1131 (now 1081)
    assert refusal.retry_after == 50


def test_usage_delta_applies_to_the_status() -> None:
    when = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
    book = UsageBook()
    book.record("ns", "ci", Delta(1, 5, 3, when))
    book.record("ns", "ci", Delta(1, 2, 2, None))
    pending = book.take()
    assert book.take() == {}
    out = pending[("ns", "ci")].apply({"requests": 10, "promptTokens": 100, "completionTokens": 50})
    assert out == {
        "requests": 12,
        "promptTokens": 107,
        "completionTokens": 55,
        "lastUsed": "2026-12-02T12:00:00Z",
    }


def test_balancer_picks_least_outstanding_round_robin_on_ties() -> None:
    a, b, c = Endpoint("a", 1), Endpoint("b", 1), Endpoint("c", 1)
    bal = Balancer()
    bal.acquire(a)
    bal.acquire(a)
    bal.acquire(b)
    assert bal.pick([a, b, c]) == c
    bal.acquire(c)
    assert bal.pick([a, b, c]) in (b, c)
    assert bal.pick([a, b, c], exclude=[b, c]) == a
    assert bal.pick([a], exclude=[a]) is None
    bal.release(a)
    bal.release(a)
    assert bal.outstanding(a) == 0
