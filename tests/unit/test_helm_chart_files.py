"""The Helm chart's NATS configuration files are the kustomize base's, byte for byte (the chart cannot read deploy/base)."""

from __future__ import annotations

from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
CHART_FILES = DEPLOY / "helm" / "podsweep" / "files"


@pytest.mark.parametrize(
    ("chart_file", "kustomize_file"),
    [
        pytest.param("nats/accounts.conf", "base/nats/accounts.conf", id="accounts"),
        pytest.param("nats/nats.conf", "base/nats/nats.conf", id="nats-plain"),
        pytest.param("nats/nats-tls.conf", "overlays/prod/nats.conf", id="nats-tls"),
    ],
)
def test_chart_nats_file_equals_the_kustomize_one(chart_file: str, kustomize_file: str) -> None:
    chart = (CHART_FILES / chart_file).read_text()
    kustomize = (DEPLOY / kustomize_file).read_text()
    assert chart == kustomize, (
        f"deploy/helm/podsweep/files/{chart_file} differs from deploy/{kustomize_file}: "
        f"copy it (cp deploy/{kustomize_file} deploy/helm/podsweep/files/{chart_file})"
    )
