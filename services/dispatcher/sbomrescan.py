"""`podsweep sbom-rescan`: an SBOM rescan Job's one container: downloads every SBOM of the batch, runs `trivy sbom` on
each in turn, uploads every report (presigned URLs from the environment, as `podsweep download` / `upload` take them).

One container and one Python start per batch instead of a container per digest and two more for the transfers: the
per-container starts (and their status updates) were most of a batched rescan's cost. Never a shell: each Trivy starts from an argv list whose paths are podsweep's own
(`<in>/<n>.cdx.json`, `<out>/<n>.json`), with an environment of podsweep's choosing and nothing inherited.

Per-item outcome: before each item, and when one fails, the process logs one line of its own (`sbom rescan item`,
with `item` and `state`); Trivy's output goes to a file, never to the log, so nothing an SBOM holds can forge such a
line. The Job's container uses `FallbackToLogsOnError`, so a failed run's termination message is its log's tail, and
the watcher (services/watcher/jobstatus.py) names the item of the last such line: the first failure stops the batch,
as one failing container per item did before (that item ScanError, the others BatchAborted).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from podsweep import logs
from schemas import jobs
from services.dispatcher import upload

log = logs.get("podsweep.sbom_rescan")

EXIT_OK = 0
EXIT_ITEM_FAILED = 1
EXIT_BAD_INPUT = 2
MARK = jobs.RESCAN_ITEM_EVENT  # the event of the lines the watcher reads (schemas.jobs.RescanItemLine)
TRIVY_OUTPUT_TAIL = 600  # characters of a failed Trivy's output quoted (escaped, on one line) in the log
# A Trivy server loses a scan's blob when another client scanning an SBOM of the same packages at the same moment
# deletes it after its own scan ("layer cache missing", seen with batches of identical SBOMs in parallel): another
# try, a little later, puts it again. An SBOM Trivy cannot read fails every time.
RETRY_PAUSES_S = (1.0, 3.0)  # before the second and the third try
ATTEMPTS = len(RETRY_PAUSES_S) + 1


def sbom_path(in_dir: str, n: int) -> str:
    return f"{in_dir}/{n}.cdx.json"


def report_path(out_dir: str, n: int) -> str:
    return f"{out_dir}/{n}.json"


def sbom_url_env(n: int) -> str:
    """The environment variable holding item `n`'s presigned SBOM GET URL."""
    return f"PODSWEEP_SBOM_{n}_URL"


def raw_url_env(n: int) -> str:
    """The environment variable holding item `n`'s report upload URL."""
    return f"PODSWEEP_RAW_{n}_URL"


Transfer = Callable[[Sequence[str]], int]


def rescan_batch(
    count: int,
    *,
    trivy: str,
    trivy_flags: Sequence[str],
    in_dir: str,
    out_dir: str,
    work_dir: str,
    download: Transfer = upload.download,
    send: Transfer = upload.run,
    runner: Runner | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Download every SBOM, scan them (`run`), upload every report. A failed transfer names no item (the watcher
    then blames none: BatchAborted for all); exit codes as `run`, a transfer's own (1 failed, 2 bad input) too."""
    if not 1 <= count <= 1000:
        log.error("sbom rescan refused", error=f"--count is {count} (1 to 1000)")
        return EXIT_BAD_INPUT
    code = download([f"{sbom_path(in_dir, n)}={sbom_url_env(n)}" for n in range(count)])
    if code != 0:
        log.error("sbom rescan: the SBOMs were not downloaded", exit_code=code)
        return code
    code = run(
        count,
        trivy=trivy,
        trivy_flags=trivy_flags,
        in_dir=in_dir,
        out_dir=out_dir,
        work_dir=work_dir,
        runner=runner or _run_trivy,
        sleep=sleep,
    )
    if code != 0:
        return code
    code = send([f"{report_path(out_dir, n)}={raw_url_env(n)}" for n in range(count)])
    if code != 0:
        log.error("sbom rescan: the reports were not uploaded", exit_code=code)
    return code


def item_argv(trivy: str, trivy_flags: Sequence[str], in_dir: str, out_dir: str, n: int) -> list[str]:
    """The argv of item `n`'s Trivy: JSON report to `<out>/<n>.json` from `<in>/<n>.cdx.json`."""
    return [trivy, "sbom", "--format", "json", "--output", report_path(out_dir, n), *trivy_flags, sbom_path(in_dir, n)]


Runner = Callable[[list[str], dict[str, str], Path], int]


def _run_trivy(argv: list[str], env: dict[str, str], output: Path) -> int:
    with output.open("wb") as sink:
        return subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink, check=False).returncode


def run(
    count: int,
    *,
    trivy: str,
    trivy_flags: Sequence[str],
    in_dir: str,
    out_dir: str,
    work_dir: str,
    runner: Runner = _run_trivy,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Scan items 0..count-1 in order, each tried up to ATTEMPTS times; stop at the first item that fails every try.
    Exit 0 all scanned, 1 an item failed, 2 bad input."""
    if not 1 <= count <= 1000:
        log.error("sbom rescan refused", error=f"--count is {count} (1 to 1000)")
        return EXIT_BAD_INPUT
    env = {"TMPDIR": work_dir, "HOME": work_dir}  # nothing inherited: Trivy reads TRIVY_* and proxy variables
    output = Path(work_dir) / "trivy-output.txt"
    for n in range(count):
        log.info(MARK, item=n, state="running")
        argv = item_argv(trivy, trivy_flags, in_dir, out_dir, n)
        for attempt in range(1, ATTEMPTS + 1):
            try:
                code = runner(argv, env, output)
            except OSError as exc:
                log.error(MARK, item=n, state="failed", error=f"trivy did not start: {exc.strerror or exc}")
                return EXIT_ITEM_FAILED
            if code == 0:
                break
            said = output.read_text(errors="replace")[-TRIVY_OUTPUT_TAIL:] if output.exists() else ""
            if attempt < ATTEMPTS:
                log.warning("sbom rescan item retried", item=n, exit_code=code, trivy_said=repr(said))
                sleep(RETRY_PAUSES_S[attempt - 1])
                continue
            log.error(MARK, item=n, state="failed", exit_code=code, trivy_said=repr(said))
            return EXIT_ITEM_FAILED
    log.info(MARK, item=count - 1, state="done", scanned=count)
    return EXIT_OK
