"""Reading a Hugging Face checkpoint folder before it is imported: is it whole, what is in it.

Only file headers are read (safetensors keeps tensor names, dtypes, shapes and byte offsets in a
JSON header), so a 93 GB folder is inspected in milliseconds and without torch. A shard whose
size disagrees with its own header (a truncated copy, say) is refused; when the folder carries a
`manifest.json` (ours, `sirocco.manifest/v1`) every file must also match its recorded sha256.
"""

from __future__ import annotations

import json
import math
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from catalog.artifacts import sha256_of_file

# The format runtime/loader.py verifies downloads against (a light module: no torch).
from runtime.manifest import MANIFEST_FORMAT, MANIFEST_NAME

SAFETENSORS_INDEX = "model.safetensors.index.json"
# safetensors dtype names → catalog ModelVersion.Dtype values. Other tensors (integer buffers,
# say) count as parameters but do not decide the version's dtype.
SAFETENSORS_DTYPES = {
    "F32": "float32",
    "BF16": "bfloat16",
    "F16": "float16",
    "F8_E4M3": "fp8",
    "F8_E5M2": "fp8",
    "I8": "int8",
    "U8": "int8",
}
# Headers beyond this are not a safetensors file (the format caps them at 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(Exception):
    """The folder cannot be imported; the message names the file and what is wrong."""


@dataclass
class Checkpoint:
    folder: Path
    config: dict
    files: list[str]  # relative POSIX paths, sorted, manifest.json excluded
    weight_files: list[str]
    total_parameters: int
    expert_parameters: int
    dtype: str
    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        return sum(self.sizes.values())

    @property
    def num_experts(self) -> int | None:
        return self.config.get("num_local_experts") or self.config.get("num_experts")

    @property
    def experts_per_token(self) -> int | None:
        return self.config.get("num_experts_per_tok")

    @property
    def active_parameters(self) -> int:
        """Parameters one token runs through: all but the experts the router skips."""
        if not self.num_experts or not self.experts_per_token or not self.expert_parameters:
            return self.total_parameters
        skipped = self.expert_parameters * (self.num_experts - self.experts_per_token)
        return self.total_parameters - skipped // self.num_experts

    @property
    def context_length(self) -> int | None:
        return self.config.get("max_position_embeddings")


def inspect_checkpoint(folder: Path) -> Checkpoint:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder.")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"{folder} has no config.json: point --from at a Hugging Face model folder "
            "(config.json, *.safetensors, tokenizer files)."
        )
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"config.json is not valid JSON: {error}") from error
    if not isinstance(config, dict) or "model_type" not in config:
        raise CheckpointError("config.json has no model_type: is this a transformers checkpoint?")

    files = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    files = [f for f in files if f != MANIFEST_NAME]
    weight_files = [f for f in files if f.endswith(".safetensors")]
    if not weight_files:
        raise CheckpointError(
            f"{folder} has no *.safetensors weights (other formats are not imported)."
        )
    index_path = folder / SAFETENSORS_INDEX
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{SAFETENSORS_INDEX} is not a valid index: {error}") from error
        missing = sorted(set(weight_map.values()) - set(weight_files))
        if missing:
            raise CheckpointError(
                f"{SAFETENSORS_INDEX} lists shards that are not in the folder: "
                f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}"
            )

    total = experts = 0
    elements_by_dtype: Counter[str] = Counter()
    for name in weight_files:
        for tensor, (dtype, shape) in _safetensors_tensors(folder / name).items():
            count = math.prod(shape)
            total += count
            if ".experts." in tensor:
                experts += count
            if dtype in SAFETENSORS_DTYPES:
                elements_by_dtype[SAFETENSORS_DTYPES[dtype]] += count
    return Checkpoint(
        folder=folder,
        config=config,
        files=files,
        weight_files=weight_files,
        total_parameters=total,
        expert_parameters=experts,
        dtype=elements_by_dtype.most_common(1)[0][0] if elements_by_dtype else "bfloat16",
        sizes={f: (folder / f).stat().st_size for f in files},
    )


def _safetensors_tensors(path: Path) -> dict[str, tuple[str, list[int]]]:
    """name → (dtype, shape) from a safetensors header, after checking the file is whole."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path.name} is corrupted: shorter than a safetensors header.")
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(
                f"{path.name} is corrupted: its header claims {header_length} bytes, "
                f"the file has {size}."
            )
        try:
            header = json.loads(handle.read(header_length))
        except (ValueError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{path.name} is corrupted: unreadable header.") from error
    tensors = {}
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            tensors[name] = (info["dtype"], list(info["shape"]))
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{path.name} is corrupted: bad entry for {name}.") from error
        data_end = max(data_end, end)
        if start > end:
            raise CheckpointError(f"{path.name} is corrupted: bad offsets for {name}.")
    expected = 8 + header_length + data_end
    if expected != size:
        raise CheckpointError(
            f"{path.name} is corrupted: its header describes {expected} bytes, the file has "
            f"{size}{' (truncated?)' if size < expected else ''}."
        )
    return tensors


def build_manifest(checkpoint: Checkpoint, progress=None) -> dict:
    """Size and sha256 of every file. When the folder brought its own manifest, each file must
    match it: a shard damaged since the manifest was written is caught here, before upload."""
    entries = []
    for relative in checkpoint.files:
        path = checkpoint.folder / relative
        entries.append(
            {
                "path": relative,
                "size": path.stat().st_size,
                "sha256": sha256_of_file(path, progress),
            }
        )
    manifest = {"format": MANIFEST_FORMAT, "files": entries}
    existing = checkpoint.folder / MANIFEST_NAME
    if existing.is_file():
        _check_against(manifest, existing)
    return manifest


def _check_against(manifest: dict, existing_path: Path) -> None:
    try:
        recorded = {e["path"]: e for e in json.loads(existing_path.read_text())["files"]}
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"The folder's {MANIFEST_NAME} is not valid: {error}") from error
    problems = []
    for entry in manifest["files"]:
        expected = recorded.get(entry["path"])
        if expected is None:
            continue  # a file added after the manifest was written: nothing to check it against
        if expected.get("size") != entry["size"]:
            problems.append(
                f"{entry['path']}: size {entry['size']}, the manifest says {expected.get('size')}"
            )
        elif expected.get("sha256") != entry["sha256"]:
            problems.append(f"{entry['path']}: sha256 differs from the folder's manifest")
    missing = sorted(set(recorded) - {e["path"] for e in manifest["files"]})
    problems += [f"{path}: listed in the folder's manifest but missing" for path in missing]
    if problems:
        raise CheckpointError("Corrupted checkpoint: " + "; ".join(problems))


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode()
