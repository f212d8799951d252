"""A model version's tokenizer files on local disk, for gateway/tokens.py.

A version in a local artifact folder (the embedded default) is read in place. From any other
store only the tokenizer files are fetched, never the weights, through the catalog's artifact
store (so the store's configuration applies: AWS_ENDPOINT_URL, credentials, …), into
VAR_DIR/gateway-tokenizers/<digest>/. The digest names the version's URI and the files'
recorded size and sha256: a folder appears only whole (renamed into place), so once there it
is used as it is, by this process and later ones, without the network (a store outage after a
restart changes nothing), and a re-imported version gets a folder of its own. Every download
is checked against the sha256 the catalog recorded at import.

Downloads block: this runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from django.conf import settings

from catalog.artifacts import ArtifactStore, get_store, store_from_url

# What gateway.tokens.ModelTokenizer reads; tokenizer.json is the one it cannot do without.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
REQUIRED = "tokenizer.json"
CACHE_FOLDER = "gateway-tokenizers"

# boto3 makes clients from its default session, which is not thread-safe.
_STORE_LOCK = threading.Lock()


class TokenizerFetchError(Exception):
    """A tokenizer file came down different from what the catalog recorded."""


@dataclass(frozen=True)
class TokenizerSource:
    """Where a version's files are, and what the catalog recorded of its tokenizer files:
    name → (size, sha256). `recorded` is None when the version has no recorded artifacts at
    all (its URI was set by hand): then the store is asked which files exist."""

    artifact_uri: str
    recorded: dict[str, tuple[int, str]] | None


def tokenizer_folder(source: TokenizerSource) -> Path | None:
    """A local folder holding the version's tokenizer files; None when it has no
    tokenizer.json. Store errors (ArtifactStoreError) and TokenizerFetchError propagate."""
    parsed = urlparse(source.artifact_uri)
    if parsed.scheme in ("", "file"):
        folder = Path(unquote(parsed.path) if parsed.scheme else source.artifact_uri)
        return folder if (folder / REQUIRED).is_file() else None
    store, prefix = _store_for(source.artifact_uri)
    wanted = _wanted_files(store, prefix, source.recorded)
    if REQUIRED not in wanted:
        return None
    cache = Path(settings.VAR_DIR) / CACHE_FOLDER
    folder = cache / _digest(source.artifact_uri, wanted)
    if folder.is_dir():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(
        dir=cache, prefix=".partial-", ignore_cleanup_errors=True
    ) as partial:
        for name, (_size, sha256) in wanted.items():
            # A few MB at most, read in this thread (get_file would start a transfer pool).
            data = store.read_bytes(_key(prefix, name))
            if sha256 and (actual := hashlib.sha256(data).hexdigest()) != sha256:
                raise TokenizerFetchError(
                    f"{source.artifact_uri}/{name} has sha256 {actual}, the catalog recorded "
                    f"{sha256}: the stored file changed since the import."
                )
            (Path(partial) / name).write_bytes(data)
        try:
            Path(partial).rename(folder)
        except OSError:
            if not folder.is_dir():
                raise
            # Another process put the same files there first.
    return folder


def _store_for(uri: str) -> tuple[ArtifactStore, str]:
    """The configured store and the version's prefix in it when the version lives there;
    else a store rooted at the URI itself (the store setting changed since the import)."""
    with _STORE_LOCK:
        store = get_store()
        root = store.url.rstrip("/") + "/"
        if uri.startswith(root):
            return store, uri[len(root) :].strip("/")
        return store_from_url(uri), ""


def _key(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _wanted_files(
    store: ArtifactStore, prefix: str, recorded: dict[str, tuple[int, str]] | None
) -> dict[str, tuple[int, str]]:
    if recorded is not None:
        return {name: recorded[name] for name in TOKENIZER_FILES if name in recorded}
    found = {}
    for name in TOKENIZER_FILES:
        stored = store.stat(_key(prefix, name))
        if stored is not None:
            found[name] = (stored.size, stored.sha256)
    return found


def _digest(uri: str, files: dict[str, tuple[int, str]]) -> str:
    described = json.dumps([uri, sorted(files.items())])
    return hashlib.sha256(described.encode()).hexdigest()[:32]
