"""Log output: lines for people on a terminal, JSON elsewhere or when asked; `up`'s JSON log file."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from podsweep import logs


@pytest.mark.parametrize(
    ("setting", "terminal", "expected"),
    [
        pytest.param("auto", True, "console", id="auto-on-a-terminal-reads-as-text"),
        pytest.param("auto", False, "json", id="auto-in-a-pipe-is-json"),
        pytest.param("json", True, "json", id="json-asked-for-on-a-terminal"),
        pytest.param("console", False, "console", id="console-asked-for-in-a-pipe"),
        pytest.param("json", False, "json", id="json-asked-for-in-a-pipe"),
        pytest.param("console", True, "console", id="console-asked-for-on-a-terminal"),
    ],
)
def test_log_format_follows_the_setting_then_the_terminal(setting: logs.Format, terminal: bool, expected: str) -> None:
    assert logs.choose_format(setting, terminal) == expected


@pytest.fixture
def restore_logs() -> Iterator[None]:
    yield
    logs.configure()


@pytest.mark.usefixtures("restore_logs")
def test_every_line_also_goes_to_the_log_file_as_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "data" / "logs" / "up.log"
    logs.configure("info", "console", file=path)
    logs.get("podsweep.test").info("scan created", digest="app@sha256:" + "ab" * 32, node="node-1")
    logs.get("podsweep.test").debug("below the level")
    logs.configure("info", "console")  # closes the file

    lines = path.read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["event"] == "scan created" and record["node"] == "node-1" and record["level"] == "info"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    shown = capsys.readouterr().err
    assert "scan created" in shown and "node=node-1" in shown
    assert not shown.lstrip().startswith("{")  # the terminal got text, not JSON


@pytest.mark.usefixtures("restore_logs")
def test_json_on_request_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("info", "json")
    logs.get("podsweep.test").warning("policy reload failed", error="x")
    record = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert record["event"] == "policy reload failed" and record["level"] == "warning"


@pytest.mark.usefixtures("restore_logs")
def test_a_log_file_past_its_size_starts_over_keeping_one_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "up.log"
    path.write_text("old line\n" * 10)
    monkeypatch.setattr(logs, "FILE_KEEP_BYTES", 50)
    logs.configure("info", "json", file=path)
    logs.get("podsweep.test").info("fresh")
    logs.configure("info", "json")
    assert (tmp_path / "up.log.1").read_text().startswith("old line")
    assert [json.loads(line)["event"] for line in path.read_text().splitlines()] == ["fresh"]
