"""Datasets in object storage: ``s3://bucket/prefix`` as ``nag prepare --output`` and as ``data_dir``.

A remote dataset is a ``nag prepare`` folder uploaded as it is (``meta.json`` last, so a prefix
with ``meta.json`` is complete), so it describes itself: ``meta.json`` and ``tokenizer.json`` are
fetched into a local cache folder and litdata streams the shards from the bucket into that folder,
for every rank and node. The endpoint and credentials are boto3's: the standard ``AWS_*``
environment variables (``AWS_ENDPOINT_URL`` for an S3-compatible store) and ``~/.aws`` files.

litdata's own client retries for a long time (it is built to ride out throttling); before it is
used, one quick request with two attempts checks the bucket, so a missing bucket, refused
credentials or an unreachable endpoint are a clear error within seconds.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from nag_lightning.errors import NagError

SCHEME = "s3://"
SMALL_FILES = ("meta.json", "tokenizer.json")


def is_remote(path) -> bool:
    return str(path).startswith(SCHEME)


def split_url(url: str) -> tuple[str, str]:
    """(bucket, key prefix without a trailing slash) of ``s3://bucket/prefix``."""
    bucket, _, prefix = str(url)[len(SCHEME):].partition("/")
    if not bucket:
        raise NagError(f"{url} names no bucket; write s3://BUCKET/PREFIX.")
    return bucket, prefix.strip("/")


def join(url: str, *parts: str) -> str:
    return "/".join([str(url).rstrip("/"), *parts])


def client():
    try:
        import boto3
        from botocore.config import Config
    except ImportError as error:
        raise NagError(f"s3:// datasets need boto3 ({error}); install it with: pip install \"nag-lightning[s3]\"") from None

    # A new session each time: boto3's default one keeps the credentials it first found.
    return boto3.session.Session().client("s3", config=Config(retries={"max_attempts": 2, "mode": "standard"},
                                                               connect_timeout=5, read_timeout=60))


def explain(error: Exception, url: str) -> NagError:
    """A boto3 error as one sentence that names the problem and the fix."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    endpoint = os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
    if isinstance(error, NoCredentialsError):
        return NagError(f"no AWS credentials for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                        "~/.aws/credentials, or an instance role).")
    if isinstance(error, EndpointConnectionError):
        return NagError(f"cannot reach the object store at {endpoint} for {url}: check AWS_ENDPOINT_URL (or the "
                        "endpoint_url in ~/.aws/config) and the network.")
    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code"))
        if code in ("404", "NoSuchBucket"):
            return NagError(f"the bucket of {url} does not exist at {endpoint}: create it, or fix the URL.")
        if code in ("403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
            return NagError(f"{endpoint} refused the credentials for {url} ({code}): check AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and the bucket's permissions.")
        return NagError(f"{endpoint} answered {code} for {url}: {error}")
    return NagError(f"object store request for {url} failed: {type(error).__name__}: {error}")


def check_bucket(url: str) -> None:
    """A quick request that the bucket exists and the credentials are accepted."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _ = split_url(url)
    try:
        client().head_bucket(Bucket=bucket)
    except (BotoCoreError, ClientError) as error:
        raise explain(error, url) from None


def cache_folder(url: str, cache_dir: str | None) -> Path:
    """Where a remote dataset's small files and streamed chunks are kept on this machine."""
    root = Path(cache_dir) if cache_dir else Path(os.environ.get("NAG_CACHE", Path.home() / ".cache" / "nag_lightning"))
    bucket, prefix = split_url(url)
    digest = hashlib.sha256(str(url).rstrip("/").encode()).hexdigest()[:12]
    return root / f"{bucket}-{prefix.replace('/', '_') or 'root'}-{digest}"


def fetch_small_files(url: str, folder: Path) -> Path:
    """``meta.json`` and ``tokenizer.json`` of the dataset at ``url``, downloaded into ``folder``
    (each through a temporary name, so ranks that fetch at once never read half a file)."""
    from botocore.exceptions import BotoCoreError, ClientError

    check_bucket(url)
    bucket, prefix = split_url(url)
    folder.mkdir(parents=True, exist_ok=True)
    s3 = client()
    for name in SMALL_FILES:
        target = folder / name
        partial = folder / f".{name}.{os.getpid()}"
        try:
            s3.download_file(bucket, "/".join(p for p in (prefix, name) if p), str(partial))
        except ClientError as error:
            if str(error.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey"):
                raise NagError(f"{url} holds no complete dataset (no {name}): build it with `nag prepare --output "
                               f"{url} --corpus ...`.") from None
            raise explain(error, url) from None
        except BotoCoreError as error:
            raise explain(error, url) from None
        os.replace(partial, target)
    return folder


def read_remote_meta(url: str) -> dict | None:
    """The ``meta.json`` of a remote dataset, or None where the prefix holds none."""
    import json

    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split_url(url)
    try:
        body = client().get_object(Bucket=bucket, Key="/".join(p for p in (prefix, "meta.json") if p))["Body"]
        return json.loads(body.read())
    except ClientError as error:
        if str(error.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey"):
            return None
        raise explain(error, url) from None
    except BotoCoreError as error:
        raise explain(error, url) from None


def upload_folder(folder: Path, url: str) -> None:
    """Upload a finished dataset folder under ``url``; ``meta.json`` last, so readers never see a
    prefix with ``meta.json`` whose shards are still on their way. An older ``meta.json`` there is
    deleted first."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split_url(url)
    s3 = client()
    files = sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.name == "meta.json")
    try:
        s3.delete_object(Bucket=bucket, Key="/".join(p for p in (prefix, "meta.json") if p))
        for path in files:
            s3.upload_file(str(path), bucket, "/".join(p for p in (prefix, path.relative_to(folder).as_posix()) if p))
    except (BotoCoreError, ClientError) as error:
        raise explain(error, url) from None


def let_litdata_use_plain_http(worker_id: int | None = None) -> None:
    """An ``http://`` endpoint (a local S3-compatible store: MinIO, moto) for litdata's chunk
    downloads. litdata hands obstore its endpoint but not ``allow_http``, and obstore refuses plain
    HTTP without it ("builder error"); its client options are module state (litdata 0.2.76, which
    has no public option for it), so every process that downloads sets it: the main one, and each
    loader worker through ``worker_init_fn`` (a worker started from a fork server inherits nothing)."""
    if not (os.environ.get("AWS_ENDPOINT_URL") or "").startswith("http://"):
        return
    from litdata.streaming import downloader

    options = getattr(downloader, "_OBSTORE_CLIENT_OPTIONS", None)
    if isinstance(options, dict):
        options["allow_http"] = True
