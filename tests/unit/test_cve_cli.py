"""`podsweep cve` refuses bad input before it reads anything: a clear message and exit 2, never a traceback; and it
imports only what it reads with."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from podsweep_cli.app import app

ROOT = Path(__file__).resolve().parents[2]

# Nothing listens here: a command that got past its input checks would fail with an S3 error, not these messages.
ENV = {
    "PODSWEEP_S3_ENDPOINT_URL": "http://127.0.0.1:9",
    "PODSWEEP_S3_ACCESS_KEY_ID": "k",
    "PODSWEEP_S3_SECRET_ACCESS_KEY": "s",
    "PODSWEEP_DATA_DIR": "/nonexistent-podsweep",
}


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["CVE-24-1"], "is not a vulnerability id"),
        (["CVE-2024-3094;id"], "is not a vulnerability id"),
        (["$(id)"], "is not a vulnerability id"),
        (["../../index"], "is not a vulnerability id"),
        (["*"], "is not a vulnerability id"),
        (["--package", "lib*"], "patterns are not supported"),
        (["--package", "a;rm -rf /"], "is not a package name"),
        (["--package", "$(id)"], "is not a package name"),
        (["--package", "../etc/passwd"], "is not a package name"),
        (["--package", "liblzma5@$(id)"], "is not a version"),
        ([], "give a vulnerability id"),
        (["CVE-2024-3094", "--package", "x"], "not both"),
        (["CVE-2024-3094", "--cluster", "../east"], "is not a cluster name"),
    ],
)
def test_bad_input_gets_a_clear_answer_and_exit_2(args: list[str], says: str) -> None:
    result = CliRunner().invoke(app, ["cve", *args], env=ENV)
    assert result.exit_code == 2, result.output
    assert says in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("path_style", "says"),
    [
        ("true", "s3: cannot reach http://127.0.0.1:9 (bucket podsweep, key index/by-cve/"),  # stdlib GETs
        ("false", "s3: cannot read index/ from bucket podsweep"),  # virtual-hosted: boto3's
    ],
    ids=["presigned_get", "boto3"],
)
def test_an_unreachable_store_is_an_error_naming_the_bucket_not_a_traceback(path_style: str, says: str) -> None:
    env = {**ENV, "PODSWEEP_S3_BUCKET": "podsweep", "PODSWEEP_S3_PATH_STYLE": path_style}
    result = CliRunner().invoke(app, ["cve", "CVE-2024-3094"], env=env)
    assert result.exit_code == 2, result.output
    assert says in result.output and "Traceback" not in result.output


def test_the_cve_command_loads_neither_boto3_nor_aiohttp_nor_asyncio() -> None:
    """What `podsweep cve` imports before it reads (its table's rich comes later, and only for a table)."""
    probe = (
        "import sys; from services.parser import cvecli; "
        "print(' '.join(m for m in ('boto3', 'botocore', 'aiohttp', 'asyncio', 'yaml', 'podsweep.embedded') "
        "if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert loaded.stdout.split() == []
