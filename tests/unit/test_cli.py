"""The podsweep command as a person meets it."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from podsweep import __version__
from podsweep.embedded import free_port
from podsweep_cli.app import app

runner = CliRunner()


def test_help_teaches_where_to_start() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "podsweep up" in result.output
    for command in ("up", "run", "config", "schemas", "version", "status", "report", "upload", "download", "check"):
        assert command in result.output


def test_up_help_explains_embedded_servers() -> None:
    result = runner.invoke(app, ["up", "--help"])
    assert result.exit_code == 0
    assert "SeaweedFS" in result.output


def test_version() -> None:
    assert runner.invoke(app, ["version"]).output.strip() == f"podsweep {__version__}"


def test_bad_config_exits_2_naming_the_key() -> None:
    result = runner.invoke(app, ["config"], env={"PODSWEEP_NATS_URL": "nats//x"})
    assert result.exit_code == 2
    assert "PODSWEEP_NATS_URL" in result.output


def test_rescan_with_nats_unreachable_exits_3_naming_the_url_without_a_traceback(tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens there: refused at once
    env = {"PODSWEEP_NATS_URL": url, "PODSWEEP_NATS_USER": "operator", "PODSWEEP_NATS_PASSWORD": "s3cret-pw"}
    env |= {"PODSWEEP_DATA_DIR": str(tmp_path), "PODSWEEP_NATS_CONNECT_TIMEOUT_S": "2"}
    result = runner.invoke(app, ["rescan", "--all"], env=env)
    assert result.exit_code == 3, result.output
    assert "nothing was asked" in result.output and url in result.output
    assert "Traceback" not in result.output and "s3cret-pw" not in result.output


def test_up_without_kubeconfig_says_what_to_do(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["up", "--data-dir", str(tmp_path)], env={"KUBECONFIG": str(tmp_path / "none"), "HOME": str(tmp_path)}
    )
    assert result.exit_code == 2
    assert "no kubeconfig" in result.output and "KUBECONFIG" in result.output


def test_run_unknown_service_is_refused() -> None:
    result = runner.invoke(app, ["run", "scheduler"], env={"PODSWEEP_NATS_URL": "nats://127.0.0.1:4222"})
    assert result.exit_code == 2
    assert "unknown service" in result.output


def test_schemas_export_check_passes_on_committed_files() -> None:
    assert runner.invoke(app, ["schemas", "export", "--check"]).exit_code == 0


def test_deploy_nats_accounts_check_passes_on_the_committed_file() -> None:
    assert runner.invoke(app, ["deploy", "nats-accounts", "--check"]).exit_code == 0


def test_deploy_nats_accounts_check_fails_on_a_stale_file_and_writing_fixes_it(tmp_path: Path) -> None:
    from podsweep_cli.app import DEPLOY_DIR

    deploy = tmp_path / "deploy"
    (deploy / "base" / "nats").mkdir(parents=True)
    (deploy / "base" / "podsweep.yaml").write_text((DEPLOY_DIR / "base" / "podsweep.yaml").read_text())
    accounts = deploy / "base" / "nats" / "accounts.conf"
    committed = (DEPLOY_DIR / "base" / "nats" / "accounts.conf").read_text()
    accounts.write_text(committed.replace('"podsweep.report.quarantined",\n', ""))
    result = runner.invoke(app, ["deploy", "nats-accounts", "--check", "--deploy", str(deploy)])
    assert result.exit_code == 1 and "stale" in result.output
    assert runner.invoke(app, ["deploy", "nats-accounts", "--deploy", str(deploy)]).exit_code == 0
    assert accounts.read_text() == committed
