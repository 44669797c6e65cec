"""API keys: key directory (Kubernetes Secret layout), BERTH_API_KEYS, constant-time compare."""

from __future__ import annotations

import hmac
import os
import time
from pathlib import Path

import pytest

from berth.server import auth
from berth.server.auth import ANONYMOUS, KeyStore, parse_env_keys, read_key_dir


def _secret_dir(root: Path, keys: dict[str, str]) -> Path:
    """Lay out keys like kubelet mounts a Secret: ..data -> ..<ts>/, and name -> ..data/name."""
    ts = root / f"..{time.time_ns()}"
    ts.mkdir()
    for name, value in keys.items():
        (ts / name).write_text(value + "\n")
    data = root / "..data"
    tmp = root / "..data_tmp"
    tmp.symlink_to(ts.name)
    os.replace(tmp, data)
    for name in keys:
        link = root / name
        if not link.is_symlink():
            link.symlink_to(Path("..data") / name)
    return root


def test_env_keys_named_and_bare() -> None:
    assert parse_env_keys("team-a:sk-aaa, sk-bbb,,") == [("team-a", "sk-aaa"), ("env-1", "sk-bbb")]
    assert parse_env_keys(None) == []


def test_key_dir_reads_secret_layout_and_skips_hidden(tmp_path: Path) -> None:
    _secret_dir(tmp_path, {"alice": "sk-alice", "bob": "sk-bob"})
    (tmp_path / ".hidden").write_text("sk-hidden")
    (tmp_path / "empty").write_text("\n")
    assert read_key_dir(tmp_path) == [("alice", "sk-alice"), ("bob", "sk-bob")]


def test_authenticate_returns_key_id(tmp_path: Path) -> None:
    _secret_dir(tmp_path, {"alice": "sk-alice"})
    store = KeyStore(tmp_path, "ci:sk-ci")
    assert store.enabled
    assert store.authenticate("Bearer sk-alice") == "alice"
    assert store.authenticate("bearer sk-ci") == "ci"
    assert store.authenticate("Bearer sk-alicE") is None
    assert store.authenticate("Bearer sk-alice-and-more") is None
    assert store.authenticate("Basic sk-alice") is None
    assert store.authenticate("sk-alice") is None
    assert store.authenticate(None) is None
    assert store.authenticate("Bearer ") is None


def test_no_keys_configured_means_auth_off() -> None:
    store = KeyStore(None, None)
    assert not store.enabled
    assert store.authenticate(None) == ANONYMOUS


def test_empty_key_dir_refuses_everyone(tmp_path: Path) -> None:
    store = KeyStore(tmp_path, None)
    assert store.enabled
    assert store.authenticate("Bearer anything") is None


def test_rotated_secret_is_picked_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "_RELOAD_CHECK_SECONDS", 0.0)
    _secret_dir(tmp_path, {"alice": "sk-old"})
    store = KeyStore(tmp_path, None)
    assert store.authenticate("Bearer sk-old") == "alice"
    time.sleep(0.01)
    _secret_dir(tmp_path, {"alice": "sk-new"})
    assert store.authenticate("Bearer sk-new") == "alice"
    assert store.authenticate("Bearer sk-old") is None


def test_every_key_is_compared_with_compare_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    store = KeyStore(None, "a:sk-1,b:sk-2,c:sk-3")
    assert store.authenticate("Bearer sk-1") == "a"
    # no early exit: the match on the first key still compares against all three
    assert [b for _, b in calls] == [b"sk-1", b"sk-2", b"sk-3"]


def test_forwarded_key_id_is_honoured_only_from_the_gateway_key() -> None:
    store = KeyStore(env_keys="berth-gateway:bgw-secret,team-a:sk-aaa")
    assert store.authenticate_forwarded("Bearer bgw-secret", "ak-123") == "gateway/ak-123"
    assert store.authenticate_forwarded("Bearer bgw-secret", None) == "berth-gateway"
    # a tenant's own key cannot claim another id
    assert store.authenticate_forwarded("Bearer sk-aaa", "ak-123") == "team-a"
    # junk in the header is ignored, not reflected into metrics labels
    assert store.authenticate_forwarded("Bearer bgw-secret", "x\ny" + "z" * 100) == "berth-gateway"
    assert store.authenticate_forwarded("Bearer wrong", "ak-123") is None


def test_gateway_credential_matches_the_gateways_derivation() -> None:
    from berth.gateway.registry import instance_credential

    cred = instance_credential(b"master", "team-a", "chat")
    store = KeyStore(env_keys=f"berth-gateway:{cred}")
    assert store.authenticate_forwarded(f"Bearer {cred}", "ak-1") == "gateway/ak-1"
    assert (
        store.authenticate_forwarded(f"Bearer {instance_credential(b'master', 'team-a', 'other')}", "ak-1")
        is None
    )
