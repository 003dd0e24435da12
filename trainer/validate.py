"""Input checks shared by the config, the storage layer, the CLI and the run-directory preflight.

Each returns what is wrong as one phrase (or raises an argparse error), so the caller can name its own key
(`checkpoint.uri`, `GNP_DATA_S3`, `run.dir`, `--nproc`) in the one-line message. Standard library only:
trainer/config.py imports it and stays cheap to import.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from pathlib import Path

# Bucket names every S3 store accepts (the AWS general-purpose bucket rules; MinIO, Ceph and SeaweedFS
# follow them): a name outside them is refused by the server on every request, which the checkpoint
# uploader would retry for FINAL_UPLOAD_TIMEOUT_S and then report as an outage (exit 200, retried forever).
_BUCKET_CHARS = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")
_BUCKET_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_BUCKET_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")
BUCKET_RULES = (
    "3-63 characters: lowercase letters, digits, '.' and '-', starting and ending with a letter or digit, "
    "no '..', '.-' or '-.', not an IP address"
)


def bucket_problem(bucket: str) -> str:
    """Why `bucket` is not a valid S3 bucket name, or ''."""
    if not _BUCKET_CHARS.fullmatch(bucket):
        return f"bucket name {bucket!r} is invalid"
    if ".." in bucket or ".-" in bucket or "-." in bucket:
        return f"bucket name {bucket!r} has '..', '.-' or '-.'"
    try:
        ipaddress.IPv4Address(bucket)
        return f"bucket name {bucket!r} is an IP address"
    except ValueError:
        pass
    if bucket.startswith(_BUCKET_RESERVED_PREFIXES) or bucket.endswith(_BUCKET_RESERVED_SUFFIXES):
        return f"bucket name {bucket!r} uses a reserved prefix or suffix"
    return ""


def split_s3_uri(uri: str) -> tuple[str, str, str]:
    """(bucket, prefix, problem) of "s3://bucket/prefix": problem is '' for a valid URI, else what is wrong.

    The prefix may end with '/' (it is dropped); it may not start with one, nor hold empty, '.' or '..'
    segments: S3 keeps those literally, so "s3://b/a/../c" is not "s3://b/c" and `aws s3` listings of the
    run never show it where one looks."""
    if not uri.startswith("s3://"):
        return "", "", "the URI does not start with s3://"
    bucket, _, prefix = uri[5:].partition("/")
    if not bucket:
        return "", "", "the URI has no bucket name"
    if problem := bucket_problem(bucket):
        return bucket, prefix, f"{problem}; S3 bucket names: {BUCKET_RULES}"
    prefix = prefix.rstrip("/")
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        return bucket, prefix, f"key prefix {prefix!r} has an empty, '.' or '..' segment (or a leading '/')"
    if "\x00" in prefix or len(prefix.encode()) > 900:  # S3 keys: at most 1024 bytes, our names need the rest
        return bucket, prefix, "key prefix has a NUL character or is longer than 900 bytes"
    return bucket, prefix, ""


def fresh_rename_problem(path: Path) -> str:
    """What keeps run.fresh from renaming the existing run directory `path` aside (to <name>.old-<time>), or ''.

    Reads only. The rename is the first write of a fresh start, so it must be known to work before anything
    runs: '.', '/' or a folder holding the working directory (renaming it would leave this process writing
    into the renamed folder), a mount point (EBUSY), a parent this user cannot write (EACCES/EROFS)."""
    absolute = Path(os.path.abspath(path))  # a symbolic link itself is what gets renamed: not resolved here
    if absolute.parent == absolute or path.name in ("", ".", ".."):
        return f"{str(path)!r} has no name to rename"
    cwd = Path.cwd().resolve()
    if path.resolve() == cwd or path.resolve() in cwd.parents:
        return f"{str(path)!r} holds the working directory {str(cwd)!r}"
    if os.path.ismount(absolute):
        return f"{str(path)!r} is a mount point"
    if not os.access(absolute.parent, os.W_OK | os.X_OK):
        return (
            f"its parent {str(absolute.parent)!r} is not writable by this user (read-only file system or no permission)"
        )
    return ""


def int_arg(low: int, high: int):
    """argparse `type=` for an integer in low..high: the error names the option and the range (exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}; expected an integer in {low}..{high}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"invalid value {value}; expected an integer in {low}..{high}")
        return value

    parse.__name__ = f"integer in {low}..{high}"
    return parse
