"""The API client decides its proxy once at connect, from the environment, and never per request."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from podsweep.kube import Kube


def _kubeconfig(path: Path, server: str) -> str:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": server, "insecure-skip-tls-verify": True}}],
                "users": [{"name": "u", "user": {"token": "not-a-secret"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    return str(path)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"HTTPS_PROXY": "http://proxy.example:3128"}, "http://proxy.example:3128"),
        ({"HTTPS_PROXY": "http://proxy.example:3128", "NO_PROXY": "api.example"}, None),
        ({"HTTP_PROXY": "http://proxy.example:3128"}, None),  # an https server uses the https proxy only
    ],
)
async def test_proxy_comes_from_the_environment_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: str | None
) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    kube = await Kube.connect(_kubeconfig(tmp_path / "kubeconfig", "https://api.example:6443"))
    try:
        assert kube.api.rest_client.proxy == expected
        # aiohttp would otherwise look up proxies and ~/.netrc in a worker thread on every call
        assert kube.api.rest_client.pool_manager.trust_env is False
    finally:
        await kube.close()
