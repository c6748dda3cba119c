"""`podsweep upload` against a real local HTTP server: gzip body, retries after 5xx, exit codes, no URL secrets logged."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import structlog
from typer.testing import CliRunner

from services.dispatcher import upload
from services.dispatcher.cli import upload_app

FAST = upload.RetryPolicy(attempts=3, first_wait_s=0.01, max_wait_s=0.05, timeout_s=5)
SECRET = "X-Amz-Signature=deadbeefsecret"


class Receiver:
    """A PUT endpoint that answers with scripted statuses, then 200, and keeps what it received."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.received: list[tuple[str, dict[str, str], bytes]] = []
        self.objects: dict[str, bytes] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.received.append((self.path, dict(self.headers.items()), body))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self) -> None:
                self.do_PUT()

            def do_GET(self) -> None:
                receiver.received.append((self.path, dict(self.headers.items()), b""))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                body = receiver.objects.get(self.path.split("?")[0], b"") if status == 200 else b""
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}{path}?{SECRET}&X-Amz-Expires=600"


@pytest.fixture(autouse=True)
def _logging_to_live_streams() -> Iterator[None]:
    """The CLI configures logs onto the stderr of the moment; a CliRunner's is closed after its test."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


@pytest.fixture
def report(tmp_path: Path) -> Path:
    path = tmp_path / "report.json"
    path.write_text('{"SchemaVersion": 2, "Results": []}')
    return path


@pytest.mark.parametrize(
    ("statuses", "exit_code", "requests"),
    [
        pytest.param([], 0, 1, id="first-try-succeeds"),
        pytest.param([500], 0, 2, id="retried-after-a-500"),
        pytest.param([503, 429], 0, 3, id="retried-after-503-and-429"),
        pytest.param([500, 502, 503], 1, 3, id="gives-up-after-the-attempt-limit"),
        pytest.param([403], 1, 1, id="403-expired-signature-is-not-retried"),
    ],
)
def test_upload_statuses(receiver: Receiver, report: Path, statuses: list[int], exit_code: int, requests: int) -> None:
    receiver.statuses = list(statuses)
    code = upload.run([f"{report}=RAW_URL"], env={"RAW_URL": receiver.url("/bucket/raw/r.json")}, policy=FAST)
    assert code == exit_code
    assert len(receiver.received) == requests
    path, headers, body = receiver.received[-1]
    assert path.startswith("/bucket/raw/r.json?")
    assert headers["Content-Type"] == "application/gzip"
    assert "Content-Encoding" not in headers
    assert gzip.decompress(body) == report.read_bytes()


@pytest.mark.parametrize(
    ("statuses", "exit_code", "requests"),
    [
        pytest.param([], 0, 1, id="first-try-succeeds"),
        pytest.param([412], 1, 1, id="an-object-already-there-is-never-replaced"),
        pytest.param([503, 412], 0, 2, id="412-after-a-retry-is-the-earlier-attempts-write"),
        pytest.param([400], 1, 1, id="400-entity-too-large-is-not-retried"),
    ],
)
def test_an_upload_url_with_a_post_policy_is_sent_as_a_form_that_replaces_nothing(
    receiver: Receiver, report: Path, statuses: list[int], exit_code: int, requests: int
) -> None:
    receiver.statuses = list(statuses)
    base = f"http://127.0.0.1:{receiver.server.server_port}/bucket/"
    url = base + "?key=raw/r.json&x-amz-algorithm=AWS4-HMAC-SHA256&policy=eyJ9&x-amz-signature=deadbeefsecret"
    code = upload.run([f"{report}=RAW_URL"], env={"RAW_URL": url}, policy=FAST)
    assert code == exit_code
    assert len(receiver.received) == requests
    path, headers, body = receiver.received[-1]
    assert path == "/bucket/", "the fields travel in the form, not the URL"
    assert headers["If-None-Match"] == "*"
    assert headers["Content-Type"].startswith("multipart/form-data")
    fields = body.split(b"\r\n\r\n")
    assert b'name="key"' in body and fields[1].startswith(b"raw/r.json\r\n")
    assert body.index(b'name="policy"') < body.index(b'name="file"'), "S3 reads the fields before the file"
    assert gzip.compress(report.read_bytes(), compresslevel=6, mtime=0) in body


def test_every_file_goes_to_its_own_url(receiver: Receiver, report: Path, tmp_path: Path) -> None:
    sbom = tmp_path / "sbom.cdx.json"
    sbom.write_text('{"bomFormat": "CycloneDX"}')
    env = {"RAW": receiver.url("/b/raw.json"), "SBOM": receiver.url("/b/sbom.cdx.json")}
    assert upload.run([f"{report}=RAW", f"{sbom}=SBOM"], env=env, policy=FAST) == 0
    got = {p.split("?")[0]: gzip.decompress(b) for p, _, b in receiver.received}
    assert got == {"/b/raw.json": report.read_bytes(), "/b/sbom.cdx.json": sbom.read_bytes()}


@pytest.mark.parametrize(
    ("args", "env"),
    [
        pytest.param([], {}, id="no-arguments"),
        pytest.param(["{report}"], {}, id="argument-without-env-var"),
        pytest.param(["{report}=raw_url"], {"raw_url": "http://x/"}, id="lower-case-env-var-name"),
        pytest.param(["{report}=RAW"], {}, id="env-var-unset"),
        pytest.param(["{report}=RAW"], {"RAW": "file:///etc/passwd"}, id="url-not-http"),
        pytest.param(["{missing}=RAW"], {"RAW": "http://127.0.0.1:9/x"}, id="missing-file"),
        pytest.param(["{directory}=RAW"], {"RAW": "http://127.0.0.1:9/x"}, id="directory-not-file"),
    ],
)
def test_bad_input_exits_2_without_any_request(
    receiver: Receiver, report: Path, tmp_path: Path, args: list[str], env: dict[str, str]
) -> None:
    names = {"report": report, "missing": tmp_path / "nope.json", "directory": tmp_path}
    argv = [a.format(**names) for a in args]
    assert upload.run(argv, env=env, policy=FAST) == upload.EXIT_BAD_INPUT
    assert receiver.received == []


def test_unreachable_server_exits_1_after_retries(report: Path) -> None:
    from podsweep.embedded import free_port

    url = f"http://127.0.0.1:{free_port()}/b/raw.json?{SECRET}"
    assert upload.run([f"{report}=RAW"], env={"RAW": url}, policy=FAST) == upload.EXIT_UPLOAD_FAILED


def test_logs_one_line_per_attempt_and_never_the_query_string(
    receiver: Receiver, report: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    receiver.statuses = [500]
    upload.run([f"{report}=RAW"], env={"RAW": receiver.url("/b/raw.json")}, policy=FAST)
    out = capsys.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if "upload attempt" in line]
    assert len(lines) == 2
    assert "/b/raw.json" in lines[0]
    assert "deadbeef" not in out.out + out.err
    assert "X-Amz" not in out.out + out.err


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        pytest.param(
            "https://s3.example.com/b/k.json?X-Amz-Signature=s", "https://s3.example.com/b/k.json", id="query"
        ),
        pytest.param("https://user:pw@s3.example.com/b/k#frag", "https://s3.example.com/b/k", id="userinfo-fragment"),
    ],
)
def test_redact(url: str, shown: str) -> None:
    assert upload.redact(url) == shown


def test_same_file_gives_the_same_gzip_bytes(report: Path) -> None:
    assert upload.read_gzipped(str(report)) == upload.read_gzipped(str(report))


def test_cli_exit_code_is_the_upload_outcome(receiver: Receiver, report: Path) -> None:
    runner = CliRunner()
    env = {"RAW": receiver.url("/b/raw.json")}
    ok = runner.invoke(upload_app, ["upload", f"{report}=RAW", "--attempts", "2", "--max-wait", "0"], env=env)
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(upload_app, ["upload", f"{report}=UNSET_VAR_FOR_TEST"], env={})
    assert bad.exit_code == 2


SBOM = b'{"bomFormat": "CycloneDX", "specVersion": "1.7"}'


@pytest.mark.parametrize(
    ("stored", "statuses", "exit_code", "requests"),
    [
        pytest.param(SBOM, [], 0, 1, id="plain-object-written-as-is"),
        pytest.param(gzip.compress(SBOM), [], 0, 1, id="gzip-object-is-unpacked"),
        pytest.param(SBOM, [500], 0, 2, id="retried-after-a-500"),
        pytest.param(SBOM, [404], 1, 1, id="missing-object-is-not-retried"),
        pytest.param(SBOM, [503, 503, 503], 1, 3, id="gives-up-after-the-attempt-limit"),
    ],
)
def test_download(
    receiver: Receiver, tmp_path: Path, stored: bytes, statuses: list[int], exit_code: int, requests: int
) -> None:
    receiver.objects["/b/sbom.cdx.json"] = stored
    receiver.statuses = list(statuses)
    target = tmp_path / "in.cdx.json"
    code = upload.download([f"{target}=SBOM"], env={"SBOM": receiver.url("/b/sbom.cdx.json")}, policy=FAST)
    assert code == exit_code
    assert len(receiver.received) == requests
    assert (target.read_bytes() == SBOM) if exit_code == 0 else not target.exists()


def test_download_into_a_missing_directory_is_bad_input(receiver: Receiver, tmp_path: Path) -> None:
    receiver.objects["/b/s.json"] = SBOM
    target = tmp_path / "no" / "such" / "dir.json"
    code = upload.download([f"{target}=U"], env={"U": receiver.url("/b/s.json")}, policy=FAST)
    assert code == upload.EXIT_BAD_INPUT
