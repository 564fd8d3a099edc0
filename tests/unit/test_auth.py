"""Tenant and admin key handling (server/auth.py) and its checks at app start."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from server.app import create_app
from server.auth import Tenant, TenantDirectory, hash_key, load_tenants
from server.errors import AuthenticationFailed, PermissionDenied
from server.settings import Settings
from tests.unit.fakes import FakeEngine


def _write(tmp_path: Path, tenants: Any) -> Path:
    path = tmp_path / "tenants.yaml"
    path.write_text(yaml.safe_dump(tenants), encoding="utf-8")
    return path


def test_hash_key_is_sha256_hex() -> None:
    assert hash_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert hash_key("ключ") == hashlib.sha256("ключ".encode()).hexdigest()
    assert len(hash_key("")) == 64


def test_rotation_several_digests_one_tenant(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        {
            "tenants": {
                "acme": {
                    "key_sha256": [hash_key("old"), hash_key("new"), hash_key("next").upper()],
                    "adapters": ["a", "b"],
                    "default": "a",
                },
                "beta": {"key_sha256": hash_key("beta"), "adapters": ["b"]},
            }
        },
    )
    directory = load_tenants(path, ())
    for key in ("old", "new", "next"):
        tenant = directory.authenticate(f"Bearer {key}")
        assert tenant.name == "acme"
        assert tenant.default == "a"
        assert tenant.adapters == frozenset({"a", "b"})
    beta = directory.authenticate("Bearer beta")
    assert beta.name == "beta"
    assert beta.default is None
    assert beta.may_use("b")
    assert not beta.may_use("a")
    with pytest.raises(AuthenticationFailed):
        directory.authenticate("Bearer retired")


@pytest.mark.parametrize(
    "header", [None, "", "Bearer", "Bearer   ", "Basic abc", "abc", "Bearerabc", "Bearer  other"]
)
def test_authenticate_rejects(header: str | None) -> None:
    directory = TenantDirectory([Tenant("t", (hash_key("abc"),), frozenset(), None)])
    with pytest.raises(AuthenticationFailed):
        directory.authenticate(header)


def test_admin_authentication() -> None:
    directory = TenantDirectory(
        [Tenant("t", (hash_key("tenant"),), frozenset(), None)],
        admin_digests=(hash_key("admin"), hash_key("admin-next")),
    )
    directory.authenticate_admin("Bearer admin")
    directory.authenticate_admin("bearer admin-next")
    with pytest.raises(PermissionDenied):
        directory.authenticate_admin("Bearer tenant")
    for bad in (None, "", "Bearer nope", "admin"):
        with pytest.raises(AuthenticationFailed):
            directory.authenticate_admin(bad)
    with pytest.raises(AuthenticationFailed):
        directory.authenticate("Bearer admin")


def test_no_admin_key_configured_means_no_admin_access() -> None:
    directory = TenantDirectory([])
    with pytest.raises(AuthenticationFailed):
        directory.authenticate_admin("Bearer anything")


def test_admin_key_equal_to_tenant_key_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, {"tenants": {"t": {"key_sha256": hash_key("same"), "adapters": []}}})
    with pytest.raises(ValueError, match="admin key must differ"):
        load_tenants(path, (hash_key("same"),))


async def test_admin_key_equal_to_tenant_key_refused_at_app_start(tmp_path: Path) -> None:
    path = _write(tmp_path, {"tenants": {"t": {"key_sha256": hash_key("same"), "adapters": []}}})
    app = create_app(
        Settings(tenants_file=path, admin_key=SecretStr("same")),
        engine_factory=lambda s: FakeEngine(),
    )
    with pytest.raises(ValueError, match="admin key must differ"):
        async with app.router.lifespan_context(app):
            pass


def test_same_key_for_two_tenants_refused(tmp_path: Path) -> None:
    digest = hash_key("shared")
    path = _write(
        tmp_path,
        {
            "tenants": {
                "a": {"key_sha256": digest, "adapters": []},
                "b": {"key_sha256": digest.upper(), "adapters": []},
            }
        },
    )
    with pytest.raises(ValueError, match="configured twice"):
        load_tenants(path, ())


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"adapters": ["a"]}, "needs key_sha256"),
        ({"key_sha256": [], "adapters": ["a"]}, "needs key_sha256"),
        ({"key_sha256": "abc", "adapters": ["a"]}, "needs key_sha256"),
        ({"key_sha256": hash_key("k"), "adapters": ["a"], "default": "b"}, "default"),
        ("just a string", "must be a mapping"),
    ],
)
def test_invalid_tenant_specs(tmp_path: Path, spec: Any, message: str) -> None:
    path = _write(tmp_path, {"tenants": {"t": spec}})
    with pytest.raises(ValueError, match=message):
        load_tenants(path, ())


@pytest.mark.parametrize("content", ["- a\n- b\n", "tenants: [a, b]\n"])
def test_invalid_tenants_file_shape(tmp_path: Path, content: str) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match="tenants"):
        load_tenants(path, ())


def test_empty_or_missing_tenants_file(tmp_path: Path) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_text("", encoding="utf-8")
    assert load_tenants(path, ()).tenants == {}
    assert load_tenants(None, ()).tenants == {}


async def test_bad_adapters_file_refused_at_app_start(tmp_path: Path) -> None:
    adapters = tmp_path / "adapters.yaml"
    adapters.write_text("adapters: [a, b]\n", encoding="utf-8")
    app = create_app(Settings(adapters_file=adapters), engine_factory=lambda s: FakeEngine())
    with pytest.raises(ValueError, match="adapters"):
        async with app.router.lifespan_context(app):
            pass


async def test_bad_adapter_name_in_adapters_file_refused_at_app_start(tmp_path: Path) -> None:
    adapters = tmp_path / "adapters.yaml"
    adapters.write_text(yaml.safe_dump({"adapters": {"bad name": "/x"}}), encoding="utf-8")
    app = create_app(Settings(adapters_file=adapters), engine_factory=lambda s: FakeEngine())
    with pytest.raises(ValueError, match=r"A-Za-z0-9"):
        async with app.router.lifespan_context(app):
            pass
