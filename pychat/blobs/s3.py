"""Blobs in an S3 bucket (AWS S3 or any server that speaks its API: versitygw, MinIO, Ceph RGW, ...).

`s3://BUCKET[/PREFIX]?endpoint=http://host:port&region=us-east-1&create=1`: credentials come from
boto3's usual chain (`AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` in the environment, a
profile, an instance role). `create=1` creates the bucket when it is missing (development).
Files over `PART_BYTES` go up as a multipart upload, one part in memory at a time; reads are
ranged GETs streamed from the response.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError

# The size of each part of a multipart upload (S3's smallest part is 5 MiB).
PART_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class S3Url:
    bucket: str
    prefix: str
    endpoint: str | None
    region: str
    create: bool

    @classmethod
    def parse(cls, url: str) -> S3Url:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"not an s3://bucket url: {url!r}")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        prefix = parts.path.strip("/")
        return cls(
            bucket=parts.netloc,
            prefix=f"{prefix}/" if prefix else "",
            endpoint=query.get("endpoint"),
            region=query.get("region", "us-east-1"),
            create=query.get("create", "0") in ("1", "true", "yes"),
        )


class _BodyReader:
    def __init__(self, body: Any) -> None:
        self._body = body

    def read(self, size: int) -> bytes:
        data: bytes = self._body.read(size)
        return data

    def close(self) -> None:
        self._body.close()


class S3BlobStore:
    def __init__(self, url: S3Url) -> None:
        self.url = url
        self.bucket = url.bucket
        self.client = boto3.session.Session().client(
            "s3",
            endpoint_url=url.endpoint,
            region_name=url.region,
            config=BotoConfig(
                # Path-style addressing: a bucket name need not resolve as a host name.
                s3={"addressing_style": "path"},
                retries={"max_attempts": 4, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
                # The upload's sha256 is already known and checked; no second checksum per request.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                max_pool_connections=32,
            ),
        )
        # One part in memory at a time per upload (the 100 MiB memory budget of a busy server).
        self.transfer = TransferConfig(
            multipart_threshold=PART_BYTES,
            multipart_chunksize=PART_BYTES,
            max_concurrency=1,
            use_threads=False,
        )
        if url.create:
            self._create_bucket()

    @classmethod
    def from_url(cls, url: str) -> S3BlobStore:
        return cls(S3Url.parse(url))

    def _create_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            try:
                self.client.create_bucket(Bucket=self.bucket)
            except ClientError as e:
                if _code(e) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def _key(self, key: str) -> str:
        if not key or "/" in key:
            raise ValueError(f"bad blob key {key!r}")
        return self.url.prefix + key

    def put(self, key: str, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, self._key(key), Config=self.transfer)

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as e:
            if _code(e) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def open(self, key: str, start: int = 0, length: int | None = None) -> _BodyReader:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key)}
        if start or length is not None:
            end = "" if length is None else str(start + length - 1)
            args["Range"] = f"bytes={start}-{end}"
        try:
            answer = self.client.get_object(**args)
        except ClientError as e:
            if _code(e) in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(key) from None
            raise
        return _BodyReader(answer["Body"])

    def move(self, key: str, to: str) -> bool:
        try:
            # Managed copy: server-side, in parts for large objects.
            self.client.copy(
                {"Bucket": self.bucket, "Key": self._key(key)},
                self.bucket,
                self._key(to),
                Config=self.transfer,
            )
        except ClientError as e:
            if _code(e) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        self.delete(key)
        return True

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def close(self) -> None:
        self.client.close()


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))
