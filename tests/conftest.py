"""Fixtures for real servers; see tests/harness/ and docs/testing.md."""

pytest_plugins = ["tests.harness.servers", "tests.harness.kube", "tests.harness.trivy", "tests.harness.standin"]
