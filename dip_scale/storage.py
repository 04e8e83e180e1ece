"""One small API over local folders and S3, so every place that takes a path also takes s3://.

S3 goes through boto3 with the standard credential chain and the endpoint in S3_ENDPOINT_URL
(the variable Composer and streaming read; plain boto3 ignores it, hence `endpoint_url` here).
Credentials never appear in configs or logs.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from functools import lru_cache
from typing import Optional


def is_s3(path: str) -> bool:
    return path.startswith("s3://")


def join(root: str, *parts: str) -> str:
    if is_s3(root):
        return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(root, *parts)


def split_s3(url: str) -> tuple[str, str]:
    bucket, _, key = url[len("s3://") :].partition("/")
    return bucket, key


# Two budgets. Work in flight (uploads and reads during a run) rides out an outage of a few
# minutes; the probe at start-up answers within about a minute (4 tries of at most 5 s to
# connect + 10 s to answer, plus backoff), so an endpoint that refuses or never answers is one
# clear line before anything is built, not a 5-minute traceback or a silent hang.
_WORK = {"retries": {"max_attempts": 20, "mode": "standard"}, "connect_timeout": 10, "read_timeout": 60}
_PROBE = {"retries": {"max_attempts": 4, "mode": "standard"}, "connect_timeout": 5, "read_timeout": 10}


class StorageUnreachable(ConnectionError):
    """Object storage could not be reached or used; the message names the endpoint and the URL."""


@lru_cache(maxsize=None)
def s3_client(pid: int = 0, probe: bool = False):
    """A boto3 S3 client (`pid` keys the cache: clients must not cross fork())."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None, config=Config(**(_PROBE if probe else _WORK)))


def _client():
    return s3_client(os.getpid())


def endpoint() -> str:
    return os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL") or "the default AWS S3 endpoint"


def check_reachable(url: str, what: str) -> None:
    """One bounded request for the bucket of `url` (see _PROBE); StorageUnreachable names the
    endpoint, the URL and the config key `what` that holds it."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _ = split_s3(url)
    try:
        s3_client(os.getpid(), probe=True).head_bucket(Bucket=bucket)
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        why = {"404": "the bucket does not exist", "NoSuchBucket": "the bucket does not exist",
               "403": "access denied (credentials come from the AWS chain: AWS_ACCESS_KEY_ID, ...)"}.get(code, f"error {code}")
        raise StorageUnreachable(f"{what}: {url}: {why} at {endpoint()}") from None
    except BotoCoreError as e:  # refused, timed out, DNS, TLS, no credentials
        raise StorageUnreachable(f"{what}: cannot use {url}: {type(e).__name__} at {endpoint()} "
                                 f"(S3_ENDPOINT_URL; gave up after about a minute): {e}") from None


def read_bytes(path: str) -> Optional[bytes]:
    """The object's bytes, or None if it does not exist."""
    if is_s3(path):
        bucket, key = split_s3(path)
        try:
            return _client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except _client().exceptions.NoSuchKey:
            return None
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return f.read()


def exists(path: str) -> bool:
    """Whether the object or file exists (a HEAD request on S3: nothing is downloaded)."""
    if is_s3(path):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(path)
        try:
            _client().head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
    return os.path.isfile(path)


def write_bytes(path: str, data: bytes) -> None:
    """Write atomically: a reader sees the old object or the whole new one, never a part."""
    if is_s3(path):
        bucket, key = split_s3(path)
        _client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def upload_file(local: str, path: str) -> None:
    if is_s3(path):
        bucket, key = split_s3(path)
        _client().upload_file(local, bucket, key)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    shutil.copyfile(local, tmp)
    os.replace(tmp, path)


def download_file(path: str, local: str) -> None:
    """Copy an object (or local file) to a local path; FileNotFoundError names it if missing."""
    if is_s3(path):
        bucket, key = split_s3(path)
        try:
            _client().download_file(bucket, key, local)
        except Exception as e:  # noqa: BLE001 - botocore raises ClientError(404) and friends
            raise FileNotFoundError(f"cannot fetch {path}: {e}") from None
        return
    if not os.path.isfile(path):
        raise FileNotFoundError(f"not found: {path}")
    upload_file(path, local)


def list_sizes(prefix: str) -> dict[str, int]:
    """Path (full URL for S3) -> size in bytes of every object below a folder/prefix."""
    if is_s3(prefix):
        bucket, key = split_s3(prefix.rstrip("/") + "/")
        out = {}
        for page in _client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
            out.update({f"s3://{bucket}/{o['Key']}": o["Size"] for o in page.get("Contents", [])})
        return out
    out = {}
    for dirpath, _, files in os.walk(prefix):
        for f in files:
            path = os.path.join(dirpath, f)
            try:
                out[path] = os.path.getsize(path)
            except OSError:  # a link to nothing, or removed while listing
                pass
    return dict(sorted(out.items()))


def list_keys(prefix: str) -> list[str]:
    """Paths (full URLs for S3) of every object below a folder/prefix."""
    return list(list_sizes(prefix))


def remove(path: str) -> None:
    """Delete one object or file (absent is fine)."""
    if is_s3(path):
        bucket, key = split_s3(path)
        _client().delete_object(Bucket=bucket, Key=key)
    elif os.path.lexists(path):
        os.remove(path)


def remove_tree(prefix: str) -> None:
    if is_s3(prefix):
        bucket, _ = split_s3(prefix)
        keys = [split_s3(k)[1] for k in list_keys(prefix)]
        for i in range(0, len(keys), 1000):
            _client().delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]]})
        return
    shutil.rmtree(prefix, ignore_errors=True)


def check_writable(root: str) -> None:
    """Fail early, with the place named, if `root` cannot be written (bucket missing, no
    credentials, endpoint unreachable, read-only folder)."""
    if is_s3(root):
        check_reachable(root, "output")
    probe = join(root, ".dip_scale-write-probe")
    try:
        write_bytes(probe, b"ok")
        if is_s3(probe):
            bucket, key = split_s3(probe)
            _client().delete_object(Bucket=bucket, Key=key)
        else:
            os.remove(probe)
    except Exception as e:  # noqa: BLE001 - reworded for the user below
        hint = " (S3 endpoint from S3_ENDPOINT_URL, credentials from the AWS chain)" if is_s3(root) else ""
        raise PermissionError(f"cannot write to {root}{hint}: {type(e).__name__}: {e}") from None
