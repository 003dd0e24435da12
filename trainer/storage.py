"""Object storage behind checkpoints: a local folder or an S3 bucket (AWS, MinIO, Ceph, SeaweedFS, ...).

Both backends speak the same small `Storage` protocol of whole objects addressed by "/"-separated keys
relative to a root (a folder, or `s3://bucket/prefix/`):

    put(key, data)   write a whole object (readers never see a partial one)
    get(key)         read a whole object (`ObjectNotFound` if it does not exist)
    list(prefix)     keys under `prefix`, sorted
    delete(keys)     remove objects (missing ones are fine)
    abort_incomplete(prefix)   drop leftovers of interrupted writes (S3 multipart uploads, local temp files)

`put` replaces an existing key; callers that must never overwrite (the checkpointer) pick fresh keys.
`S3Storage` also streams whole files between disk and the bucket (`download_file`, `upload_file`) and lists
object sizes (`sizes`): the dataset transfers of trainer/launch.py, whose files do not fit in memory.

S3 goes through boto3 with the standard AWS credential chain (environment, shared config/profile, IRSA,
instance roles): credentials are never arguments, never stored here and never part of a message.
Failures become one-line `StorageError`s naming the URI and the S3 error code; the permanent ones
(wrong credentials, missing bucket, no permission) are `StorageConfigError`s, which are also ValueErrors,
so the CLI reports them as configuration errors (exit 2) while outages stay retryable.

    storage = open_storage("s3://my-bucket/runs/wrn", endpoint_url="http://minio:9000")
    storage = open_storage("runs/wrn/checkpoints")
"""

from __future__ import annotations

import errno
import io
import math
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

from trainer.validate import split_s3_uri

MiB = 1 << 20
# S3 limits: at most 10,000 parts per multipart upload, each >= 5 MiB (the last may be smaller).
_MAX_PARTS, _MIN_PART = 10_000, 5 * MiB
# Error codes that retrying cannot cure: the configuration (credentials, bucket, permissions) is wrong.
_PERMANENT_CODES = {
    "AccessDenied",
    "AllAccessDisabled",
    "AccountProblem",
    "AuthorizationHeaderMalformed",
    "ExpiredToken",
    "InvalidAccessKeyId",
    "InvalidBucketName",
    "InvalidToken",
    "NoSuchBucket",
    "NotSignedUp",
    "PermanentRedirect",
    "SignatureDoesNotMatch",
    "TokenRefreshRequired",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "403",
    "404",
    "301",
}


class StorageError(RuntimeError):
    """A storage operation failed; one line naming the URI (never credentials). May succeed on retry."""

    def __init__(self, message: str, *, uri: str = "", code: str = "") -> None:
        super().__init__(" ".join(message.split()))
        self.uri, self.code = uri, code


class StorageConfigError(StorageError, ValueError):
    """Wrong credentials, a missing bucket or no permission: retrying will not help (CLI exit 2)."""


class ObjectNotFound(StorageError):
    """The key does not exist."""


class LocalWriteError(StorageConfigError):
    """A local write that retrying cannot cure: disk full, quota, read-only file system, no permission, a path
    component that is a file. Permanent (CLI exit 2): a full local disk is not a storage outage."""


# errno values of a local write that a restart would hit again; other OSErrors (EIO, ...) stay retryable.
_PERMANENT_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EEXIST,
    errno.ENAMETOOLONG,
}


def local_write_error(where: str, key: str, e: OSError, path: str | os.PathLike | None = None) -> StorageError:
    """One line for a failed local write of `key` under `where` (the file `path`): LocalWriteError when
    permanent (naming the path, the cause and what to do), else a retryable StorageError."""
    if e.errno in _PERMANENT_ERRNOS:
        if e.filename is None and path is not None:  # write()/fsync() errors carry no file name
            e = OSError(e.errno, e.strerror, os.fspath(path))
        from trainer.data.convert import output_error  # the same wording as `convert --out`

        return LocalWriteError(output_error(f"checkpoint folder {where}", e), uri=where, code=type(e).__name__)
    return StorageError(f"{where}: cannot write {key!r}: {e.strerror or e}", uri=where, code=type(e).__name__)


@runtime_checkable
class Storage(Protocol):
    """Whole-object store addressed by "/"-separated keys relative to a root."""

    uri: str

    def put(self, key: str, data: bytes, progress: Callable[[int], None] | None = None) -> None:
        """Write `data` under `key` so that readers see all of it or nothing; `progress(n)` gets byte counts."""

    def get(self, key: str) -> bytes:
        """The whole object; `ObjectNotFound` if absent."""

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys starting with `prefix`."""

    def delete(self, keys: Iterable[str]) -> None:
        """Remove these keys; missing keys are ignored."""

    def abort_incomplete(self, prefix: str = "") -> None:
        """Discard leftovers of interrupted writes under `prefix` (they are never visible as objects)."""


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in key.split("/")):
        raise ValueError(f"storage key {key!r}: expected a relative path like 'step-000000001/state.pt'")
    return key


# ---------------------------------------------------------------------------------------------- local


class LocalStorage:
    """Objects as files under `root`; each write goes to a temporary file, fsync, then an atomic rename."""

    _TMP = re.compile(r"^\..+\.tmp-\d+-\d+$")

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.uri = str(self.root)

    def __repr__(self) -> str:
        return f"LocalStorage({self.uri!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*_check_key(key).split("/"))

    def put(self, key: str, data: bytes, progress: Callable[[int], None] | None = None) -> None:
        """Write via temp file + fsync + rename (+ fsync of the folder, so the rename survives a power cut)."""
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{id(data)}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            try:  # a half-written temp file must not keep filling the disk
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            raise local_write_error(self.uri, key, e, path) from None
        if progress is not None:
            progress(len(data))

    def get(self, key: str) -> bytes:
        """Read the file; `ObjectNotFound` if it is missing."""
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(f"{self.uri}: {key!r} does not exist", uri=self.uri, code="NoSuchKey") from None
        except OSError as e:
            raise StorageError(
                f"{self.uri}: cannot read {key!r}: {e.strerror or e}", uri=self.uri, code=type(e).__name__
            ) from None

    def list(self, prefix: str = "") -> list[str]:
        """Files under the root (temporary files excluded) whose key starts with `prefix`."""
        if not self.root.is_dir():
            return []
        out = []
        for dirpath, _, files in os.walk(self.root):
            rel = Path(dirpath).relative_to(self.root).parts
            for name in files:
                if not self._TMP.match(name):
                    key = "/".join((*rel, name))
                    if key.startswith(prefix):
                        out.append(key)
        return sorted(out)

    def delete(self, keys: Iterable[str]) -> None:
        """Unlink the files, then prune folders left empty (never the root itself)."""
        for key in keys:
            path = self._path(key)
            try:
                path.unlink(missing_ok=True)
            except OSError as e:
                raise StorageError(
                    f"{self.uri}: cannot delete {key!r}: {e.strerror or e}", uri=self.uri, code=type(e).__name__
                ) from None
            parent = path.parent
            while parent != self.root and self.root in parent.parents:
                try:
                    parent.rmdir()
                except OSError:
                    break  # not empty
                parent = parent.parent

    def abort_incomplete(self, prefix: str = "") -> None:
        """Remove temporary files that a killed writer left behind under `prefix`."""
        if not self.root.is_dir():
            return
        for dirpath, _, files in os.walk(self.root):
            rel = "/".join(Path(dirpath).relative_to(self.root).parts)
            for name in files:
                if self._TMP.match(name) and (f"{rel}/{name}" if rel else name).startswith(prefix):
                    (Path(dirpath) / name).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- S3


def _default_endpoint() -> str:
    # botocore reads these too; we need the value to switch to path-style addressing for S3-compatible stores.
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""


class S3Storage:
    """Objects in `s3://bucket/prefix/`, written with boto3 (multipart above `multipart_chunksize`).

    Credentials come from the standard AWS chain only. `check=True` lists the prefix once so that wrong
    credentials or a missing bucket fail at startup, not at the first checkpoint hours later.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str = "",
        region: str = "",
        retry_mode: str = "standard",
        max_attempts: int = 5,
        multipart_chunksize: int = 64 * MiB,
        max_concurrency: int = 4,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        check: bool = True,
    ) -> None:
        import boto3
        from botocore.config import Config

        if not bucket or "/" in bucket or any(c.isspace() for c in bucket):
            raise ValueError(f"s3 bucket: invalid value {bucket!r}; expected a bucket name (s3://bucket/prefix)")
        if retry_mode not in ("standard", "adaptive", "legacy"):
            raise ValueError(f"s3 retry_mode: invalid value {retry_mode!r}; expected standard, adaptive or legacy")
        if max_attempts < 1:
            raise ValueError(f"s3 max_attempts: invalid value {max_attempts}; expected an integer >= 1")
        if multipart_chunksize < _MIN_PART:
            raise ValueError(
                f"multipart_chunksize: invalid value {multipart_chunksize}; expected >= {_MIN_PART} "
                f"(the S3 minimum part size)"
            )
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.uri = f"s3://{bucket}/{self.prefix}"
        self.endpoint_url = endpoint_url or _default_endpoint()
        self.chunksize, self.max_concurrency = multipart_chunksize, max_concurrency
        session = boto3.session.Session()
        self.region = region or session.region_name or "us-east-1"
        config = Config(
            retries={"mode": retry_mode, "max_attempts": max_attempts},
            # botocore >= 1.36 sends CRC checksum headers by default, which many S3-compatible stores reject.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # S3-compatible endpoints rarely serve virtual-host buckets (bucket.host); AWS itself wants the default.
            s3={"addressing_style": "path"} if self.endpoint_url else None,
        )
        self._client = session.client(
            "s3", region_name=self.region, endpoint_url=self.endpoint_url or None, config=config
        )
        if check:
            self._call(
                "access bucket", "", lambda: self._client.list_objects_v2(Bucket=bucket, Prefix=self.prefix, MaxKeys=1)
            )

    def __repr__(self) -> str:
        where = f", endpoint={self.endpoint_url!r}" if self.endpoint_url else ""
        return f"S3Storage({self.uri!r}{where})"

    def _key(self, key: str) -> str:
        return self.prefix + _check_key(key)

    def _error(self, what: str, key: str, e: Exception) -> StorageError:
        """One line naming the URI, the operation and the S3 error code; botocore messages carry no secrets."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

        where = f"{self.uri}{key}" if key else self.uri
        at = f" at {self.endpoint_url}" if self.endpoint_url else ""
        if isinstance(e, ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code") or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?"))
            msg = f"{where}: {what} failed{at}: {code} ({err.get('Message') or 'no message'})"
            if code in ("NoSuchKey", "404") and key:
                return ObjectNotFound(msg, uri=self.uri, code="NoSuchKey")
            if code in _PERMANENT_CODES:
                hint = {
                    "NoSuchBucket": f"create bucket {self.bucket!r} or fix checkpoint.uri",
                    "404": f"create bucket {self.bucket!r} or fix checkpoint.uri",
                }.get(
                    code,
                    "check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the "
                    f"pod's role) and their permissions on bucket {self.bucket!r}",
                )
                return StorageConfigError(f"{msg}; {hint}", uri=self.uri, code=code)
            return StorageError(msg, uri=self.uri, code=code)
        if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
            return StorageConfigError(
                f"{where}: {what} failed: {type(e).__name__}: no usable AWS credentials for bucket {self.bucket!r} "
                f"(set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or a role)",
                uri=self.uri,
                code=type(e).__name__,
            )
        if isinstance(e, BotoCoreError):  # endpoint unreachable, connection reset, timeouts
            return StorageError(
                f"{where}: {what} failed{at}: {type(e).__name__} ({e})", uri=self.uri, code=type(e).__name__
            )
        return StorageError(
            f"{where}: {what} failed{at}: {type(e).__name__} ({e})", uri=self.uri, code=type(e).__name__
        )

    def _call(self, what: str, key: str, fn):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn()
        except (BotoCoreError, ClientError) as e:
            raise self._error(what, key, e) from None
        except StorageError:
            raise
        except Exception as e:  # s3transfer/urllib3 errors that escaped botocore's wrapping
            raise self._error(what, key, e) from None

    def part_size(self, size: int) -> int:
        """Multipart chunk size for an object of `size` bytes: the configured size, raised (in whole MiB) so
        that the object fits in S3's 10,000 parts (64 MiB chunks already cover 625 GiB)."""
        return max(self.chunksize, math.ceil(size / (_MAX_PARTS - 1) / MiB) * MiB)

    def put(self, key: str, data: bytes, progress: Callable[[int], None] | None = None) -> None:
        """Single PUT up to the chunk size, multipart above it (parts uploaded by `max_concurrency` threads).

        A multipart object becomes visible only when CompleteMultipartUpload succeeds, so an interrupted
        upload never shows as a partial object; its parts linger until `abort_incomplete`.
        """
        from boto3.s3.transfer import TransferConfig

        chunk = self.part_size(len(data))
        cfg = TransferConfig(
            multipart_threshold=chunk,
            multipart_chunksize=chunk,
            max_concurrency=self.max_concurrency,
            use_threads=self.max_concurrency > 1,
            preferred_transfer_client="classic",
        )
        full = self._key(key)
        self._call(
            "put",
            key,
            lambda: self._client.upload_fileobj(io.BytesIO(data), self.bucket, full, Config=cfg, Callback=progress),
        )

    def get(self, key: str) -> bytes:
        """GET the whole object; `ObjectNotFound` if absent."""
        full = self._key(key)
        return self._call("get", key, lambda: self._client.get_object(Bucket=self.bucket, Key=full)["Body"].read())

    def list(self, prefix: str = "") -> list[str]:
        """All keys under the root starting with `prefix` (paginated), relative to the root."""

        def run() -> list[str]:
            out = []
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix
            )
            for page in pages:
                out.extend(o["Key"][len(self.prefix) :] for o in page.get("Contents", []))
            return sorted(out)

        return self._call("list", prefix, run)

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """{key: size in bytes} of every object under the root whose key starts with `prefix` (paginated)."""

        def run() -> dict[str, int]:
            out = {}
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix
            )
            for page in pages:
                out.update((o["Key"][len(self.prefix) :], o["Size"]) for o in page.get("Contents", []))
            return out

        return self._call("list", prefix, run)

    def _transfer_config(self, size: int):
        from boto3.s3.transfer import TransferConfig

        chunk = self.part_size(size)
        return TransferConfig(
            multipart_threshold=chunk,
            multipart_chunksize=chunk,
            max_concurrency=self.max_concurrency,
            use_threads=self.max_concurrency > 1,
            preferred_transfer_client="classic",
        )

    def download_file(self, key: str, path: str | os.PathLike) -> None:
        """Stream object `key` into the local file `path` (parent folders created).

        The bytes go to `path.part` first and are renamed when complete, so an interrupted download never
        leaves a file of the final name (datasets that are gigabytes would not fit `get`'s memory anyway).
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(path.name + ".part")
        full = self._key(key)
        self._call(
            "download",
            key,
            lambda: self._client.download_file(self.bucket, full, str(part), Config=self._transfer_config(0)),
        )
        os.replace(part, path)

    def upload_file(self, path: str | os.PathLike, key: str) -> None:
        """Stream the local file `path` into `key`; like `put`, a multipart object appears only when complete."""
        full = self._key(key)
        cfg = self._transfer_config(os.path.getsize(path))
        self._call("upload", key, lambda: self._client.upload_file(os.fspath(path), self.bucket, full, Config=cfg))

    def delete(self, keys: Iterable[str]) -> None:
        """DeleteObjects in batches of 1,000; per-key errors are raised as one StorageError."""
        keys = [self._key(k) for k in keys]
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            resp = self._call(
                "delete",
                "",
                lambda: self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}),
            )
            errors = [e for e in resp.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if errors:
                e = errors[0]
                raise StorageError(
                    f"{self.uri}: delete {e.get('Key')!r} failed: {e.get('Code')} "
                    f"({e.get('Message')}) and {len(errors) - 1} more",
                    uri=self.uri,
                    code=str(e.get("Code")),
                )

    def get_versioned(self, key: str) -> tuple[bytes, str, float]:
        """(data, ETag, age in s) of a small object; the age is the server's Date minus its LastModified, both
        from the server's clock, so a lease's staleness does not depend on the clocks of the hosts reading it."""
        from email.utils import parsedate_to_datetime

        full = self._key(key)
        resp = self._call("get", key, lambda: self._client.get_object(Bucket=self.bucket, Key=full))
        data = self._call("get", key, lambda: resp["Body"].read())
        date = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        now = parsedate_to_datetime(date) if date else resp["LastModified"]
        return data, resp["ETag"], max(0.0, (now - resp["LastModified"]).total_seconds())

    def put_if(self, key: str, data: bytes, etag: str | None) -> str:
        """Conditional PUT of a small object: create only if absent (`etag` None: If-None-Match *) or replace
        only the version `etag` (If-Match). Returns the new ETag; a lost race raises StorageError with
        code "PreconditionFailed" (S3 may also answer 409 ConditionalRequestConflict)."""
        full = self._key(key)
        cond = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
        resp = self._call(
            "conditional put", key, lambda: self._client.put_object(Bucket=self.bucket, Key=full, Body=data, **cond)
        )
        return resp["ETag"]

    def delete_if(self, key: str, etag: str) -> None:
        """Delete `key` only if it is still the version `etag` (If-Match); StorageError otherwise."""
        full = self._key(key)
        self._call(
            "conditional delete", key, lambda: self._client.delete_object(Bucket=self.bucket, Key=full, IfMatch=etag)
        )

    def abort_incomplete(self, prefix: str = "") -> None:
        """Abort multipart uploads under `prefix` that an interrupted `put` left (they hold storage)."""
        from botocore.exceptions import ClientError

        def run() -> None:
            pages = self._client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix
            )
            for page in pages:
                for up in page.get("Uploads", []):
                    try:
                        self._client.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])
                    except ClientError as e:  # aborted or completed meanwhile
                        if e.response.get("Error", {}).get("Code") != "NoSuchUpload":
                            raise

        self._call("abort incomplete uploads", prefix, run)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """("bucket", "prefix") of "s3://bucket/prefix"; ValueError naming checkpoint.uri otherwise.

    Checks the syntax too (trainer.validate.split_s3_uri): a bucket name or key the server refuses would
    otherwise fail every request, and the uploader retries those as an outage."""
    bucket, prefix, problem = split_s3_uri(uri)
    if problem:
        raise ValueError(f"checkpoint.uri: invalid value {uri!r}; expected s3://bucket/prefix ({problem})")
    return bucket, prefix


def open_storage(
    uri: str | os.PathLike,
    *,
    endpoint_url: str = "",
    region: str = "",
    retry_mode: str = "standard",
    max_attempts: int = 5,
    multipart_chunksize: int = 64 * MiB,
    check: bool = True,
) -> Storage:
    """`S3Storage` for "s3://bucket/prefix", else `LocalStorage` for a folder (created on first write).

    The S3 options are ignored for local folders. Raises StorageConfigError/StorageError when `check` finds
    the bucket unusable, ValueError for a malformed URI.
    """
    text = os.fspath(uri)
    if text.startswith("s3://"):
        bucket, prefix = parse_s3_uri(text)
        return S3Storage(
            bucket,
            prefix,
            endpoint_url=endpoint_url,
            region=region,
            retry_mode=retry_mode,
            max_attempts=max_attempts,
            multipart_chunksize=multipart_chunksize,
            check=check,
        )
    if "://" in text:
        raise ValueError(f"checkpoint.uri: invalid value {text!r}; expected s3://bucket/prefix or a local folder")
    return LocalStorage(text)
