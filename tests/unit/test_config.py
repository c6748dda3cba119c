"""Settings: defaults, file, environment, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from podsweep.config import ConfigError, load_settings


def test_defaults_need_nothing() -> None:
    settings = load_settings({})
    assert settings.nats.stream == "PODSWEEP"
    assert settings.s3.bucket == "podsweep"
    assert settings.consumer.backoff_s == [1.0, 5.0, 30.0, 120.0]


@pytest.mark.parametrize(
    ("env", "names"),
    [
        pytest.param(
            {"PODSWEEP_NATS_URL": "nats//x"}, ["nats.url", "PODSWEEP_NATS_URL", "nats://host:port"], id="bad-nats-url"
        ),
        pytest.param(
            {"PODSWEEP_CONSUMER_MAX_DELIVER": "five"}, ["consumer.max_deliver", "'five'", "int"], id="not-an-int"
        ),
        pytest.param({"PODSWEEP_S3_ENDPOINT_URL": "minio:9000"}, ["s3.endpoint_url", "http(s)://"], id="bad-s3-url"),
        pytest.param(
            {"PODSWEEP_TELEMETRY_TRACES": "jaeger"}, ["telemetry.traces", "PODSWEEP_TELEMETRY_TRACES"], id="bad-enum"
        ),
        pytest.param(
            {"PODSWEEP_CLUSTER": "Prod Cluster"}, ["cluster", "PODSWEEP_CLUSTER", "DNS-1123"], id="bad-cluster"
        ),
        pytest.param({"PODSWEEP_TELEMETRY_TRACES": "otlp"}, ["otlp_endpoint"], id="otlp-without-endpoint"),
        pytest.param({"PODSWEEP_S3_BUCKET": "Bad_Bucket"}, ["s3.bucket", "bucket name"], id="bad-bucket"),
        pytest.param(
            {"PODSWEEP_NOTIFIER_GROUP_QUIET_S": "40"},
            ["notifier.group_quiet_s", "PODSWEEP_NOTIFIER_GROUP_QUIET_S", "at most group_max_wait_s 30"],
            id="storm-quiet-longer-than-the-longest-wait",
        ),
        pytest.param(
            {"PODSWEEP_NOTIFIER_GROUP_QUIET_S": "0"}, ["notifier.group_quiet_s", "must be > 0"], id="storm-quiet-zero"
        ),
    ],
)
def test_bad_values_name_the_key_and_the_variable(env: dict[str, str], names: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    for name in names:
        assert name in str(info.value)


def test_file_then_environment_with_lists_and_secret_files(tmp_path: Path) -> None:
    (tmp_path / "podsweep.yaml").write_text("cluster: prod\nnats:\n  url: nats://nats:4222\nconsumer:\n  batch: 8\n")
    (tmp_path / "secret").write_text("s3cr3t\n")
    settings = load_settings(
        {
            "PODSWEEP_CONFIG": str(tmp_path / "podsweep.yaml"),
            "PODSWEEP_CONSUMER_BACKOFF_S": "1, 2.5",
            "PODSWEEP_CONSUMER_BATCH": "16",
            "PODSWEEP_S3_SECRET_ACCESS_KEY_FILE": str(tmp_path / "secret"),
        }
    )
    assert settings.cluster == "prod"
    assert settings.nats.url == "nats://nats:4222"
    assert settings.consumer.batch == 16  # the environment wins over the file
    assert settings.consumer.backoff_s == [1.0, 2.5]
    assert settings.s3.secret_access_key == "s3cr3t"
    assert "s3cr3t" not in repr(settings.redacted())


def test_unknown_key_in_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "podsweep.toml"
    path.write_text('[nats]\nurl = "nats://a:4222"\nstreem = "X"\n')
    with pytest.raises(ConfigError, match="streem"):
        load_settings({}, file=path)


def test_unreadable_secret_file_is_named() -> None:
    with pytest.raises(ConfigError, match="PODSWEEP_S3_SECRET_ACCESS_KEY_FILE"):
        load_settings({"PODSWEEP_S3_SECRET_ACCESS_KEY_FILE": "/nonexistent/secret"})


SECRET = "123456789"


@pytest.mark.parametrize(
    ("file_text", "env"),
    [
        pytest.param(f"nats:\n  password: {SECRET}\n", {}, id="password-of-the-wrong-type-in-the-file"),
        pytest.param(f"nats:\n  user: ''\n  password: '{SECRET}'\n", {}, id="password-without-user"),
        pytest.param("", {"PODSWEEP_NATS_PASSWORD": SECRET}, id="password-without-user-from-env"),
        pytest.param(f"s3:\n  secret_access_key: [{SECRET}]\n", {}, id="secret-key-as-a-list"),
        pytest.param(f"nats:\n  password: '{SECRET}\n  user: x\n", {}, id="yaml-syntax-error-on-the-secret-line"),
        pytest.param(f"nats:\n  token: {SECRET}\n  url: 'x'\n", {}, id="another-fields-error-next-to-a-token"),
    ],
)
def test_a_config_error_never_prints_a_secret_value(tmp_path: Path, file_text: str, env: dict[str, str]) -> None:
    path = tmp_path / "podsweep.yaml"
    path.write_text(file_text)
    with pytest.raises(ConfigError) as info:
        load_settings(env, file=path)
    assert SECRET not in str(info.value)
    assert str(info.value).startswith("config: ")
