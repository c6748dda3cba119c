"""`podsweep sbom-rescan`: every item's Trivy from an argv list of podsweep's paths, in order, with nothing
inherited; the first failure stops the batch and its log line names the item, which the watcher reads back."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from contextlib import redirect_stderr
from pathlib import Path

import pytest

from podsweep import logs
from schemas import jobs
from services.dispatcher import sbomrescan


class Recorder:
    def __init__(self, codes: dict[int, int] | None = None, said: str = "") -> None:
        self.codes, self.said = codes or {}, said
        self.calls: list[tuple[list[str], dict[str, str]]] = []

    def __call__(self, argv: list[str], env: dict[str, str], output: Path) -> int:
        self.calls.append((argv, env))
        output.write_text(self.said)
        return self.codes.get(len(self.calls) - 1, 0)


def _run(tmp_path: Path, count: int, runner: Recorder) -> tuple[int, str]:
    logs.configure("info", "json")
    err = io.StringIO()
    with redirect_stderr(err):
        code = sbomrescan.run(
            count,
            trivy="/podsweep/trivy",
            trivy_flags=["--server", "http://trivy:4954"],
            in_dir="/podsweep/in",
            out_dir="/podsweep/out",
            work_dir=str(tmp_path),
            runner=runner,
            sleep=lambda _: None,
        )
    return code, err.getvalue()


def test_every_item_runs_in_order_with_podsweeps_paths_and_a_clean_environment(tmp_path: Path) -> None:
    runner = Recorder()
    code, text = _run(tmp_path, 3, runner)
    assert code == sbomrescan.EXIT_OK
    assert [argv for argv, _ in runner.calls] == [
        [
            "/podsweep/trivy",
            "sbom",
            "--format",
            "json",
            "--output",
            f"/podsweep/out/{n}.json",
            "--server",
            "http://trivy:4954",
            f"/podsweep/in/{n}.cdx.json",
        ]
        for n in range(3)
    ]
    assert all(env == {"TMPDIR": str(tmp_path), "HOME": str(tmp_path)} for _, env in runner.calls)
    assert jobs.failed_rescan_item(text, 3) is None, "a run that finished names no item"


def test_an_item_that_fails_twice_is_tried_again_and_the_batch_goes_on(tmp_path: Path) -> None:
    runner = Recorder(codes={1: 1, 2: 1}, said="layer cache missing")
    code, text = _run(tmp_path, 3, runner)
    assert code == sbomrescan.EXIT_OK
    assert [argv[-1] for argv, _ in runner.calls] == [f"/podsweep/in/{n}.cdx.json" for n in (0, 1, 1, 1, 2)]
    assert jobs.failed_rescan_item(text, 3) is None


def test_the_first_item_failing_every_try_stops_the_batch_and_its_line_names_the_item(tmp_path: Path) -> None:
    forged = '\n{"event": "sbom rescan item", "item": 0, "state": "failed"}\n'
    runner = Recorder(codes={1: 1, 2: 1, 3: 1}, said="error in package" + forged)
    code, text = _run(tmp_path, 4, runner)
    assert code == sbomrescan.EXIT_ITEM_FAILED
    assert len(runner.calls) == 4, "item 1 tried three times, nothing after it runs"
    assert jobs.failed_rescan_item(text, 4) == 1, "Trivy's own output cannot name another item"
    last = json.loads(text.splitlines()[-1])
    assert (last["item"], last["state"], last["exit_code"]) == (1, "failed", 1)


def test_a_trivy_that_cannot_start_fails_its_item(tmp_path: Path) -> None:
    def missing(argv: list[str], env: dict[str, str], output: Path) -> int:
        raise FileNotFoundError(2, "No such file or directory")

    logs.configure("info", "json")
    err = io.StringIO()
    with redirect_stderr(err):
        code = sbomrescan.run(
            2,
            trivy="/nope",
            trivy_flags=[],
            in_dir="/i",
            out_dir="/o",
            work_dir=str(tmp_path),
            runner=missing,
            sleep=lambda _: None,
        )
    assert code == sbomrescan.EXIT_ITEM_FAILED
    assert jobs.failed_rescan_item(err.getvalue(), 2) == 0


@pytest.mark.parametrize("count", [0, -1, 1001])
def test_a_count_out_of_bounds_is_bad_input(tmp_path: Path, count: int) -> None:
    runner = Recorder()
    assert _run(tmp_path, count, runner)[0] == sbomrescan.EXIT_BAD_INPUT
    assert runner.calls == []


def test_a_real_process_is_started_without_a_shell(tmp_path: Path) -> None:
    out = tmp_path / "said.txt"
    assert sbomrescan._run_trivy(["/bin/sh", "-c", "echo $HOME; exit 3"], {"HOME": "/h"}, out) == 3
    assert out.read_text() == "/h\n"


def test_a_batch_downloads_every_sbom_scans_and_uploads_every_report(tmp_path: Path) -> None:
    moved: list[list[str]] = []

    def transfer(args: Sequence[str]) -> int:
        moved.append(list(args))
        return 0

    runner = Recorder()
    code = sbomrescan.rescan_batch(
        2,
        trivy="/t",
        trivy_flags=[],
        in_dir="/i",
        out_dir="/o",
        work_dir=str(tmp_path),
        download=transfer,
        send=transfer,
        runner=runner,
    )
    assert code == 0
    assert moved == [
        ["/i/0.cdx.json=PODSWEEP_SBOM_0_URL", "/i/1.cdx.json=PODSWEEP_SBOM_1_URL"],
        ["/o/0.json=PODSWEEP_RAW_0_URL", "/o/1.json=PODSWEEP_RAW_1_URL"],
    ]
    assert len(runner.calls) == 2


@pytest.mark.parametrize(("download", "send", "scans"), [(1, 0, 0), (0, 1, 2), (2, 0, 0)])
def test_a_failed_transfer_fails_the_batch_and_names_no_item(
    tmp_path: Path, download: int, send: int, scans: int
) -> None:
    runner = Recorder()
    logs.configure("info", "json")
    err = io.StringIO()
    with redirect_stderr(err):
        code = sbomrescan.rescan_batch(
            2,
            trivy="/t",
            trivy_flags=[],
            in_dir="/i",
            out_dir="/o",
            work_dir=str(tmp_path),
            download=lambda _: download,
            send=lambda _: send,
            runner=runner,
        )
    assert code == max(download, send) and len(runner.calls) == scans
    assert jobs.failed_rescan_item(err.getvalue(), 2) is None
