"""Where model weights live: S3 (or any S3-compatible store) or a local folder.

`ARTIFACT_STORE_URL` chooses: `s3://bucket/prefix` goes through boto3 (so `AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, … and the rest of boto3's configuration chain apply), `file:///path` (the
embedded default, `var/artifacts`) is a plain folder. Keys are relative paths such as
`models/mixtral-tiny/v1/model.safetensors`.

Large files go up as S3 multipart uploads. An interrupted upload resumes: the store finds the
unfinished upload of the same key on the server (ListMultipartUploads) and keeps every part
whose ETag, the MD5 of the part, matches the same byte range of the local file. Every object
carries the SHA-256 of its content as metadata, so a re-import skips files already stored, and
`verify` re-reads an object to prove it still matches.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

from django.conf import settings

Progress = Callable[[int], None]
CHUNK = 1 << 20
SHA256_METADATA_KEY = "sha256"


class ArtifactStoreError(Exception):
    """The store cannot do what was asked; the message says what to check."""


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    sha256: str = ""  # as recorded when it was stored; "" when unknown


def sha256_of_file(path: Path, progress: Progress | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
            if progress:
                progress(len(chunk))
    return digest.hexdigest()


def clean_key(key: str) -> str:
    """Refuse keys that could escape the store's root ("../", absolute paths)."""
    path = PurePosixPath(key)
    if not key or path.is_absolute() or ".." in path.parts or key != path.as_posix():
        raise ArtifactStoreError(f"{key!r} is not a valid artifact key (relative, no '..').")
    return key


class ArtifactStore(ABC):
    url: str

    @abstractmethod
    def uri(self, key: str) -> str:
        """Where the runtime finds `key` (a prefix gives a folder): an s3:// URI or a path."""

    @abstractmethod
    def put_file(
        self, key: str, path: Path, *, sha256: str, progress: Progress | None = None
    ) -> StoredObject:
        """Store the file at `path` under `key`. `sha256` is its digest, recorded with it."""

    @abstractmethod
    def get_file(self, key: str, destination: Path, *, progress: Progress | None = None) -> None:
        """Download `key` into `destination` (written under another name, then renamed)."""

    @abstractmethod
    def stat(self, key: str) -> StoredObject | None:
        """Size and recorded sha256 of `key`, or None when there is no such object."""

    @abstractmethod
    def list(self, prefix: str) -> list[StoredObject]:
        """Every object whose key starts with `prefix`, sorted by key."""

    @abstractmethod
    def open_chunks(self, key: str) -> Iterator[bytes]:
        """The content of `key`, streamed."""

    @abstractmethod
    def presigned_url(self, key: str, *, expires_in: int = 3600) -> str:
        """A URL that downloads `key` without credentials until it expires."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    def put_bytes(self, key: str, data: bytes) -> StoredObject:
        with tempfile.NamedTemporaryFile(delete=False) as handle:
            handle.write(data)
        try:
            return self.put_file(key, Path(handle.name), sha256=hashlib.sha256(data).hexdigest())
        finally:
            os.unlink(handle.name)

    def read_bytes(self, key: str) -> bytes:
        return b"".join(self.open_chunks(key))

    def compute_sha256(self, key: str, progress: Progress | None = None) -> str:
        """Read `key` back and hash what is actually stored (not what was recorded)."""
        digest = hashlib.sha256()
        for chunk in self.open_chunks(key):
            digest.update(chunk)
            if progress:
                progress(len(chunk))
        return digest.hexdigest()


class LocalArtifactStore(ArtifactStore):
    """A folder. Writes go to a temporary file renamed into place, so a reader never sees half
    a file. Recorded digests live in a separate `.sha256/` tree, so that a model's folder holds
    exactly the model's files (the runtime loads the folder as it is)."""

    def __init__(self, root: Path, url: str = ""):
        self.root = Path(root).resolve()
        self.url = url or self.root.as_uri()
        self._digests = self.root / ".sha256"

    def _path(self, key: str) -> Path:
        return self.root / clean_key(key)

    def _digest_path(self, key: str) -> Path:
        return self._digests / f"{clean_key(key)}.sha256"

    def uri(self, key: str) -> str:
        # The runtime's --model takes a plain path for local folders.
        return str(self.root / clean_key(key.rstrip("/")))

    def put_file(self, key, path, *, sha256, progress=None):
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        with open(path, "rb") as source, open(partial, "wb") as sink:
            for chunk in iter(lambda: source.read(CHUNK), b""):
                sink.write(chunk)
                if progress:
                    progress(len(chunk))
        partial.replace(target)
        digest_path = self._digest_path(key)
        digest_path.parent.mkdir(parents=True, exist_ok=True)
        digest_path.write_text(sha256)
        return StoredObject(key=key, size=target.stat().st_size, sha256=sha256)

    def get_file(self, key, destination, *, progress=None):
        source = self._path(key)
        if not source.is_file():
            raise ArtifactStoreError(f"No object {key!r} in {self.url}.")
        destination = Path(destination)
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = destination.with_name(destination.name + ".partial")
        with open(source, "rb") as handle, open(partial, "wb") as sink:
            for chunk in iter(lambda: handle.read(CHUNK), b""):
                sink.write(chunk)
                if progress:
                    progress(len(chunk))
        partial.replace(destination)

    def stat(self, key):
        path = self._path(key)
        if not path.is_file():
            return None
        digest_path = self._digest_path(key)
        recorded = digest_path.read_text().strip() if digest_path.is_file() else ""
        return StoredObject(key=key, size=path.stat().st_size, sha256=recorded)

    def list(self, prefix):
        if prefix:
            clean_key(prefix.rstrip("/"))
        base = self.root / prefix if prefix else self.root
        folder = base if base.is_dir() else base.parent
        if not folder.is_dir():
            return []
        found = []
        for path in folder.rglob("*"):
            if not path.is_file() or path.name.endswith(".partial"):
                continue
            key = path.relative_to(self.root).as_posix()
            if key.startswith(".sha256/") or not key.startswith(prefix):
                continue
            found.append(self.stat(key))
        return sorted(found, key=lambda o: o.key)

    def open_chunks(self, key):
        path = self._path(key)
        if not path.is_file():
            raise ArtifactStoreError(f"No object {key!r} in {self.url}.")
        with open(path, "rb") as handle:
            yield from iter(lambda: handle.read(CHUNK), b"")

    def presigned_url(self, key, *, expires_in=3600):
        # A local file needs no signature; the URL is only usable on this machine.
        return self._path(key).as_uri()

    def delete(self, key):
        self._path(key).unlink(missing_ok=True)
        self._digest_path(key).unlink(missing_ok=True)


@dataclass(frozen=True)
class MultipartConfig:
    """Files of `threshold` bytes or more go up in parts of `part_size` (S3 wants ≥ 5 MiB for
    every part but the last, and at most 10,000 parts), `max_concurrency` at a time."""

    threshold: int = 64 * 1024 * 1024
    part_size: int = 64 * 1024 * 1024
    max_concurrency: int = 4

    def part_size_for(self, size: int) -> int:
        # 10,000 parts of 64 MiB is 640 GiB; bigger files get bigger parts.
        return max(self.part_size, -(-size // 10_000))


class S3ArtifactStore(ArtifactStore):
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        multipart: MultipartConfig | None = None,
        state_dir: Path | None = None,
        client=None,
    ):
        import boto3

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        # endpoint_url None lets boto3 read AWS_ENDPOINT_URL (or talk to AWS itself).
        self.client = client or boto3.client("s3", endpoint_url=endpoint_url)
        self.multipart = multipart or MultipartConfig()
        # Unfinished multipart uploads, so that an interrupted import resumes (see above).
        self.state_dir = Path(state_dir or Path(settings.VAR_DIR) / "upload-state")

    def _key(self, key: str) -> str:
        key = clean_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _prefix(self, prefix: str) -> str:
        """A key prefix under the store's own ("models/m/v1/" keeps its slash)."""
        root = f"{self.prefix}/" if self.prefix else ""
        if not prefix:
            return root
        slash = "/" if prefix.endswith("/") else ""
        return root + clean_key(prefix.rstrip("/")) + slash

    def uri(self, key):
        return f"s3://{self.bucket}/{self._key(key.rstrip('/'))}"

    @contextlib.contextmanager
    def _errors(self, action: str, key: str):
        """boto3's exceptions as ArtifactStoreError naming the object and what failed."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (BotoCoreError, ClientError) as error:
            raise ArtifactStoreError(
                f"Could not {action} s3://{self.bucket}/{self._key(key)}: {error}"
            ) from error

    def put_file(self, key, path, *, sha256, progress=None):
        size = Path(path).stat().st_size
        with self._errors("upload", key):
            if size < self.multipart.threshold:
                with open(path, "rb") as body:
                    self.client.put_object(
                        Bucket=self.bucket,
                        Key=self._key(key),
                        Body=body,
                        Metadata={SHA256_METADATA_KEY: sha256},
                    )
                if progress:
                    progress(size)
            else:
                self._multipart_upload(key, Path(path), size, sha256, progress)
        return StoredObject(key=key, size=size, sha256=sha256)

    def _multipart_upload(self, key, path, size, sha256, progress):
        full_key = self._key(key)
        upload_id, done = self._resumable_upload(full_key, path, size, sha256)
        part_size = self.multipart.part_size_for(size)
        count = -(-size // part_size)
        already = sum(min(part_size, size - (n - 1) * part_size) for n in done)
        if progress and already:
            progress(already)
        lock = threading.Lock()

        def send(number: int) -> dict:
            offset = (number - 1) * part_size
            with open(path, "rb") as handle:
                handle.seek(offset)
                data = handle.read(part_size)
            response = self.client.upload_part(
                Bucket=self.bucket,
                Key=full_key,
                UploadId=upload_id,
                PartNumber=number,
                Body=data,
            )
            if progress:
                with lock:
                    progress(len(data))
            return {"PartNumber": number, "ETag": response["ETag"]}

        missing = [n for n in range(1, count + 1) if n not in done]
        with ThreadPoolExecutor(max_workers=self.multipart.max_concurrency) as pool:
            futures = [pool.submit(send, number) for number in missing]
            try:
                sent = [future.result() for future in futures]
            except BaseException:
                # Stop at the first failure; the parts sent so far are kept for the resume.
                for future in futures:
                    future.cancel()
                raise
        parts = sorted([*done.values(), *sent], key=lambda p: p["PartNumber"])
        self.client.complete_multipart_upload(
            Bucket=self.bucket,
            Key=full_key,
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},
        )
        self._state_path(full_key).unlink(missing_ok=True)

    def _state_path(self, full_key: str) -> Path:
        name = hashlib.sha256(f"{self.bucket}/{full_key}".encode()).hexdigest()[:32]
        return self.state_dir / f"{name}.json"

    def _resumable_upload(self, full_key, path, size, sha256) -> tuple[str, dict[int, dict]]:
        """The id of an unfinished upload of this same content to resume, with its parts that
        match the local file; else a new upload and no parts.

        S3 does not say what an unfinished upload was of, so the upload id and the sha256 it
        was started for are kept in a local state file until the upload completes.
        """
        from botocore.exceptions import ClientError

        part_size = self.multipart.part_size_for(size)
        state_path = self._state_path(full_key)
        if state_path.is_file():
            state = json.loads(state_path.read_text())
            if state.get("sha256") == sha256 and state.get("part_size") == part_size:
                upload_id = state["upload_id"]
                try:
                    listed = list(self._list_parts(full_key, upload_id))
                except ClientError:  # gone: completed, aborted or expired by a lifecycle rule
                    listed = None
                if listed is not None:
                    done = {}
                    for part in listed:
                        number, etag = part["PartNumber"], part["ETag"]
                        expected = min(part_size, size - (number - 1) * part_size)
                        if part["Size"] == expected and etag.strip('"') == _md5_of_range(
                            path, (number - 1) * part_size, expected
                        ):
                            done[number] = {"PartNumber": number, "ETag": etag}
                    return upload_id, done
            else:
                # Started for other content: it can never be completed, so free its parts.
                with contextlib.suppress(ClientError):
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=full_key, UploadId=state["upload_id"]
                    )
        created = self.client.create_multipart_upload(
            Bucket=self.bucket, Key=full_key, Metadata={SHA256_METADATA_KEY: sha256}
        )
        state_path.parent.mkdir(parents=True, exist_ok=True)
        state_path.write_text(
            json.dumps(
                {
                    "upload_id": created["UploadId"],
                    "key": full_key,
                    "sha256": sha256,
                    "part_size": part_size,
                }
            )
        )
        return created["UploadId"], {}

    def _list_parts(self, full_key, upload_id) -> Iterator[dict]:
        paginator = self.client.get_paginator("list_parts")
        for page in paginator.paginate(Bucket=self.bucket, Key=full_key, UploadId=upload_id):
            yield from page.get("Parts", [])

    def get_file(self, key, destination, *, progress=None):
        destination = Path(destination)
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = destination.with_name(destination.name + ".partial")
        with self._errors("download", key):
            self.client.download_file(self.bucket, self._key(key), str(partial), Callback=progress)
        partial.replace(destination)

    def stat(self, key):
        from botocore.exceptions import ClientError

        try:
            response = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise ArtifactStoreError(
                f"Cannot read s3://{self.bucket}/{self._key(key)}: {error}"
            ) from error
        return StoredObject(
            key=key,
            size=response["ContentLength"],
            sha256=response.get("Metadata", {}).get(SHA256_METADATA_KEY, ""),
        )

    def list(self, prefix):
        full_prefix = self._prefix(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        found = []
        with self._errors("list", prefix or "."):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
                for entry in page.get("Contents", []):
                    found.append(StoredObject(key=entry["Key"][strip:], size=entry["Size"]))
        return sorted(found, key=lambda o: o.key)

    def open_chunks(self, key):
        with self._errors("download", key):
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        try:
            yield from body.iter_chunks(CHUNK)
        finally:
            body.close()

    def presigned_url(self, key, *, expires_in=3600):
        return self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._key(key)},
            ExpiresIn=expires_in,
        )

    def delete(self, key):
        with self._errors("delete", key):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))


def _md5_of_range(path: Path, offset: int, length: int) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        handle.seek(offset)
        remaining = length
        while remaining:
            chunk = handle.read(min(CHUNK, remaining))
            if not chunk:
                break
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.hexdigest()


def store_from_url(url: str, **options) -> ArtifactStore:
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ArtifactStoreError(f"{url!r} names no bucket; use s3://bucket/prefix.")
        return S3ArtifactStore(parsed.netloc, parsed.path, **options)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ArtifactStoreError(f"{url!r}: use file:///absolute/path.")
        return LocalArtifactStore(Path(unquote(parsed.path)), url=url)
    raise ArtifactStoreError(
        f"ARTIFACT_STORE_URL {url!r} is not supported; use s3://bucket/prefix or file:///path."
    )


def default_store_url() -> str:
    """settings.ARTIFACT_STORE_URL, else the `artifacts` folder under VAR_DIR (read when
    needed, so that code which moves VAR_DIR, tests included, moves the store with it)."""
    return settings.ARTIFACT_STORE_URL or (Path(settings.VAR_DIR).resolve() / "artifacts").as_uri()


def get_store() -> ArtifactStore:
    """The store named by settings.ARTIFACT_STORE_URL."""
    return store_from_url(default_store_url())


__all__ = [
    "ArtifactStore",
    "ArtifactStoreError",
    "LocalArtifactStore",
    "MultipartConfig",
    "S3ArtifactStore",
    "StoredObject",
    "get_store",
    "sha256_of_file",
    "store_from_url",
]
