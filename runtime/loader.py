"""Find the model folder: a local path, or `s3://bucket/prefix` downloaded into a cache.

S3 goes through boto3, so `AWS_ENDPOINT_URL` and the usual credential chain apply (any
S3-compatible store works). When the folder holds a `manifest.json` (the catalog writes one),
every file it lists is checked for size and sha256 before the model loads; a mismatch stops the
runtime rather than serving the wrong weights.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path, PurePosixPath

from runtime.manifest import MANIFEST_NAME, sha256_of

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path(os.environ.get("SIROCCO_RUNTIME_CACHE", "~/.cache/sirocco-runtime"))


class ModelLoadError(Exception):
    pass


def resolve_model(uri: str, *, cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """Return a local folder holding the model named by `uri`, verified against its manifest."""
    if uri.startswith("s3://"):
        folder = download_from_s3(uri, cache_dir.expanduser())
    else:
        folder = Path(uri).expanduser()
        if not folder.is_dir():
            raise ModelLoadError(f"model folder {folder} does not exist")
    verify_manifest(folder)
    return folder


def download_from_s3(uri: str, cache_dir: Path, *, nested: bool = True) -> Path:
    """Copy the objects under `uri` into `cache_dir/bucket/prefix` (or `cache_dir` itself when
    not `nested`); files already there with the right size are kept."""
    import boto3

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/")
    if not bucket:
        raise ModelLoadError(f"{uri} names no bucket; expected s3://bucket/prefix")
    client = boto3.client("s3")
    key_prefix = f"{prefix}/" if prefix else ""
    objects = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key_prefix):
        objects.extend(page.get("Contents", []))
    objects = [o for o in objects if not o["Key"].endswith("/")]
    if not objects:
        raise ModelLoadError(f"no objects under {uri}")

    target = cache_dir / bucket / prefix if nested else cache_dir
    total = sum(o["Size"] for o in objects)
    progress = _Progress(uri, total)
    logger.info(
        "downloading %s (%d files, %.1f MB) into %s", uri, len(objects), total / 1e6, target
    )
    for entry in objects:
        relative = _safe_relative(entry["Key"][len(key_prefix) :])
        destination = target / relative
        if destination.is_file() and destination.stat().st_size == entry["Size"]:
            progress.add(entry["Size"])  # already cached; the manifest check still reads it
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = destination.with_name(destination.name + ".partial")
        client.download_file(bucket, entry["Key"], str(partial), Callback=progress.add)
        partial.replace(destination)
    progress.done()
    return target


def verify_manifest(folder: Path) -> None:
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        logger.info("no %s in %s: files are not checksummed", MANIFEST_NAME, folder)
        return
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as error:
        raise ModelLoadError(f"{manifest_path} is not a valid manifest: {error}") from error
    for entry in files:
        path = folder / _safe_relative(entry["path"])
        if not path.is_file():
            raise ModelLoadError(f"{entry['path']} is listed in the manifest but missing")
        size = path.stat().st_size
        if size != entry["size"]:
            raise ModelLoadError(
                f"{entry['path']}: size {size} does not match the manifest's {entry['size']}"
            )
        digest = sha256_of(path)
        if digest != entry["sha256"]:
            raise ModelLoadError(
                f"{entry['path']}: sha256 {digest} does not match the manifest's {entry['sha256']}"
            )
    logger.info("verified %d files of %s against %s", len(files), folder, MANIFEST_NAME)


def _safe_relative(key: str) -> PurePosixPath:
    relative = PurePosixPath(key)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ModelLoadError(f"refusing the object name {key!r}: it leaves the model folder")
    return relative


class _Progress:
    """Logs download progress at most every two seconds (boto3 calls back from its threads)."""

    def __init__(self, uri: str, total: int):
        self.uri = uri
        self.total = max(total, 1)
        self.done_bytes = 0
        self.started = time.monotonic()
        self.last_log = 0.0
        self.lock = threading.Lock()

    def add(self, count: int) -> None:
        with self.lock:
            self.done_bytes += count
            now = time.monotonic()
            if now - self.last_log >= 2.0:
                self.last_log = now
                self._log(now)

    def done(self) -> None:
        self._log(time.monotonic())

    def _log(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-6)
        logger.info(
            "downloading %s: %.1f/%.1f MB (%.0f%%, %.1f MB/s)",
            self.uri,
            self.done_bytes / 1e6,
            self.total / 1e6,
            100 * self.done_bytes / self.total,
            self.done_bytes / 1e6 / elapsed,
        )
