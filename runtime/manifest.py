"""manifest.json: every file of a model folder with its size and sha256.

The catalog writes one beside each imported checkpoint and the runtime checks downloads against
it. Kept free of heavy imports: the weight fetcher uses it without loading torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "sirocco.manifest/v1"


def write_manifest(folder: Path) -> dict:
    """List every file of `folder` except the manifest itself, with size and sha256."""
    folder = Path(folder)
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative == MANIFEST_NAME:
            continue
        files.append({"path": relative, "size": path.stat().st_size, "sha256": sha256_of(path)})
    manifest = {"format": MANIFEST_FORMAT, "files": files}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
