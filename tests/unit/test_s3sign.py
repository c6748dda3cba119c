"""The bucket root podsweep builds without botocore is the one botocore addresses, or None where only botocore can
say; a URL signed under it is the URL botocore presigns for the same key, method, expiry and instant."""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
from botocore.config import Config

from podsweep.s3sign import QuerySigner, path_style_root
from schemas.storage import StorageKey

KEY = StorageKey("index/by-digest/ab.json")
# (endpoint_url, region): what podsweep signs on its own, path style.
OWN = {
    "seaweedfs_loopback": ("http://127.0.0.1:8333", "us-east-1"),
    "trailing_slash": ("http://127.0.0.1:8333/", "us-east-1"),
    "minio_https_port": ("https://minio.example.com:9000", "eu-west-3"),
    "https_no_port": ("https://s3.example.com", "us-east-1"),
    "ipv6": ("http://[::1]:9000", "us-east-1"),
    "path_prefix": ("http://gw.example.com:8080/s3", "us-east-1"),
    "aws_us_east_1": ("", "us-east-1"),
    "aws_eu_west_3": ("", "eu-west-3"),
    "aws_ap_southeast_5": ("", "ap-southeast-5"),
    "aws_il_central_1": ("", "il-central-1"),
}


@pytest.fixture
def no_aws_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore reads the environment and ~/.aws/config; the cases here hold neither."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_USE_FIPS_ENDPOINT", "AWS_USE_DUALSTACK_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")


@pytest.mark.usefixtures("no_aws_config")
@pytest.mark.parametrize("method", ["GET", "PUT"])
@pytest.mark.parametrize(("endpoint", "region"), list(OWN.values()), ids=list(OWN))
def test_a_url_signed_under_the_root_is_the_one_botocore_presigns(endpoint: str, region: str, method: str) -> None:
    root = path_style_root(endpoint, region, "my.bucket", True, {}, False)
    assert root is not None
    client = boto3.client(
        "s3",
        endpoint_url=endpoint or None,
        region_name=region,
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )
    operation = "get_object" if method == "GET" else "put_object"
    expected: str = client.generate_presigned_url(operation, Params={"Bucket": "my.bucket", "Key": KEY}, ExpiresIn=60)
    assert root == expected.split("?", 1)[0].removesuffix(KEY)
    stamp = parse_qs(urlsplit(expected).query)["X-Amz-Date"][0]
    at = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    signer = QuerySigner(root, region, "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
    assert signer.presign(method, KEY, 60, at) == expected


BOTOCORE_DECIDES = {
    "virtual_hosted": ("https://s3.example.com", "us-east-1", False, {}, False),
    "https_default_port": ("https://s3.example.com:443", "us-east-1", True, {}, False),
    "http_default_port": ("http://s3.example.com:80", "us-east-1", True, {}, False),
    "upper_case_host": ("http://S3.Example.com:8333", "us-east-1", True, {}, False),
    "user_info": ("http://user:pw@s3.example.com:9000", "us-east-1", True, {}, False),
    "query": ("http://s3.example.com:9000/?x=1", "us-east-1", True, {}, False),
    "dot_dot_path": ("http://s3.example.com:9000/a/../b", "us-east-1", True, {}, False),
    "quoted_path": ("http://s3.example.com:9000/a%20b", "us-east-1", True, {}, False),
    "aws_china": ("", "cn-north-1", True, {}, False),
    "aws_govcloud": ("", "us-gov-west-1", True, {}, False),
    "aws_iso": ("", "us-iso-east-1", True, {}, False),
    "aws_global": ("", "aws-global", True, {}, False),
    "aws_endpoint_env": ("", "eu-west-3", True, {"AWS_ENDPOINT_URL_S3": "http://x"}, False),
    "aws_fips_env": ("", "eu-west-3", True, {"AWS_USE_FIPS_ENDPOINT": "true"}, False),
    "aws_regional_us_east_1_env": ("", "us-east-1", True, {"AWS_S3_US_EAST_1_REGIONAL_ENDPOINT": "regional"}, False),
    "aws_profile_env": ("", "eu-west-3", True, {"AWS_PROFILE": "prod"}, False),
    "aws_shared_config_file": ("", "eu-west-3", True, {}, True),
}


@pytest.mark.parametrize("case", list(BOTOCORE_DECIDES.values()), ids=list(BOTOCORE_DECIDES))
def test_where_only_botocore_knows_the_address_there_is_no_root(
    case: tuple[str, str, bool, dict[str, str], bool],
) -> None:
    endpoint, region, path_style, environ, aws_config = case
    assert path_style_root(endpoint, region, "my.bucket", path_style, environ, aws_config) is None
