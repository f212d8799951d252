"""Embeddings: a BERT-format encoder, its batching engine, and POST /v1/embeddings.

An embedding model is a `BertModel` checkpoint in sentence-transformers' layout (what
runtime/tiny_embedding.py writes, and the layout of `BAAI/bge-*` and `intfloat/e5-*` English
models): the token states of one bidirectional forward pass are pooled (mean over the real
tokens, or the [CLS] state, as 1_Pooling/config.json says) and normalised to unit length.
`dimensions` keeps the first N components and normalises again (Matryoshka truncation), allowed
only where config.json declares it (`matryoshka_dimensions` or `is_matryoshka`, vLLM's names),
so a model not trained for it is not silently degraded.

The engine runs on its own thread. Each pass takes every waiting input of every waiting
request (up to `max_num_seqs` sequences and a padded-token budget), sorted by length so that
padding stays small, and hands each request its rows when all of its inputs are done: many
small requests share one forward pass, and one large request is cut into several.

Request validation is by hand, as for completions (runtime/protocol.py): each check names the
parameter, and anything unsupported is refused.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from runtime.protocol import RequestError, error_body

logger = logging.getLogger(__name__)

# OpenAI's limit on inputs in one request.
MAX_INPUTS = 2048
ENCODING_FORMATS = ("float", "base64")
_KNOWN_FIELDS = {"model", "input", "encoding_format", "dimensions", "user"}


def is_embedding_checkpoint(folder: Path) -> bool:
    """A folder this module serves: a BertModel checkpoint."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return config.get("model_type") == "bert"


@dataclass(frozen=True)
class EncoderSpec:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    layer_norm_eps: float
    pooling: str  # "mean" or "cls"
    # None: `dimensions` is refused; () any size up to hidden_size; else these sizes only.
    matryoshka_dimensions: tuple[int, ...] | None

    @classmethod
    def from_folder(cls, folder: Path) -> EncoderSpec:
        config = json.loads((folder / "config.json").read_text())
        if config.get("model_type") != "bert":
            raise ValueError(f"expected a BERT checkpoint, got {config.get('model_type')!r}")
        if config.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"unsupported activation {config['hidden_act']!r}: only gelu")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are implemented")
        pooling = "mean"
        pooling_path = folder / "1_Pooling" / "config.json"
        if pooling_path.is_file():
            pooling_config = json.loads(pooling_path.read_text())
            if pooling_config.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif not pooling_config.get("pooling_mode_mean_tokens", True):
                raise ValueError("1_Pooling/config.json: only mean and CLS pooling are implemented")
        dimensions = config.get("matryoshka_dimensions")
        if dimensions:
            matryoshka = tuple(sorted(int(d) for d in dimensions))
        elif config.get("is_matryoshka"):
            matryoshka = ()
        else:
            matryoshka = None
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=config["num_attention_heads"],
            max_position_embeddings=config["max_position_embeddings"],
            layer_norm_eps=config.get("layer_norm_eps", 1e-12),
            pooling=pooling,
            matryoshka_dimensions=matryoshka,
        )


class BertEncoder:
    """BertModel's forward pass over a padded batch, pooled and normalised."""

    def __init__(self, spec: EncoderSpec, folder: Path, *, dtype: torch.dtype, device):
        from safetensors.torch import load_file

        self.spec = spec
        self.device = torch.device(device)
        tensors = {}
        for path in sorted(folder.glob("*.safetensors")):
            tensors.update(load_file(path))
        # Checkpoints saved from BertForMaskedLM & co. carry a "bert." prefix.
        tensors = {name.removeprefix("bert."): t for name, t in tensors.items()}

        def take(name: str) -> torch.Tensor:
            if name not in tensors:
                raise ValueError(f"{folder}: the checkpoint has no tensor {name!r}")
            return tensors[name].to(device=self.device, dtype=dtype).contiguous()

        self.word = take("embeddings.word_embeddings.weight")
        self.position = take("embeddings.position_embeddings.weight")
        self.token_type = take("embeddings.token_type_embeddings.weight")[0]
        self.embed_norm = (take("embeddings.LayerNorm.weight"), take("embeddings.LayerNorm.bias"))
        self.layers = []
        for index in range(spec.num_layers):
            prefix = f"encoder.layer.{index}"
            attention = f"{prefix}.attention"
            self.layers.append(
                {
                    # [3 * hidden, hidden]: query, key, value rows
                    "qkv": torch.cat(
                        [take(f"{attention}.self.{n}.weight") for n in ("query", "key", "value")]
                    ),
                    "qkv_bias": torch.cat(
                        [take(f"{attention}.self.{n}.bias") for n in ("query", "key", "value")]
                    ),
                    "out": take(f"{attention}.output.dense.weight"),
                    "out_bias": take(f"{attention}.output.dense.bias"),
                    "attention_norm": (
                        take(f"{attention}.output.LayerNorm.weight"),
                        take(f"{attention}.output.LayerNorm.bias"),
                    ),
                    "up": take(f"{prefix}.intermediate.dense.weight"),
                    "up_bias": take(f"{prefix}.intermediate.dense.bias"),
                    "down": take(f"{prefix}.output.dense.weight"),
                    "down_bias": take(f"{prefix}.output.dense.bias"),
                    "output_norm": (
                        take(f"{prefix}.output.LayerNorm.weight"),
                        take(f"{prefix}.output.LayerNorm.bias"),
                    ),
                }
            )

    @torch.inference_mode()
    def encode(self, batch: list[list[int]]) -> torch.Tensor:
        """Unit vectors [len(batch), hidden], float32 on the CPU."""
        spec = self.spec
        length = max(len(ids) for ids in batch)
        tokens = torch.zeros(len(batch), length, dtype=torch.long)
        mask = torch.zeros(len(batch), length, dtype=torch.bool)
        for row, ids in enumerate(batch):
            tokens[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = True
        tokens, mask = tokens.to(self.device), mask.to(self.device)
        hidden = self.word[tokens] + self.position[:length][None] + self.token_type
        hidden = self._norm(hidden, self.embed_norm)  # [batch, length, hidden]
        heads, head_dim = spec.num_heads, spec.hidden_size // spec.num_heads
        attend = mask[:, None, None, :]  # padded keys are never attended to
        for layer in self.layers:
            qkv = F.linear(hidden, layer["qkv"], layer["qkv_bias"])
            q, k, v = (
                part.view(len(batch), length, heads, head_dim).transpose(1, 2)
                for part in qkv.chunk(3, dim=-1)
            )
            attention = F.scaled_dot_product_attention(q, k, v, attn_mask=attend)
            attention = attention.transpose(1, 2).reshape(len(batch), length, spec.hidden_size)
            hidden = self._norm(
                hidden + F.linear(attention, layer["out"], layer["out_bias"]),
                layer["attention_norm"],
            )
            up = F.gelu(F.linear(hidden, layer["up"], layer["up_bias"]))
            hidden = self._norm(
                hidden + F.linear(up, layer["down"], layer["down_bias"]), layer["output_norm"]
            )
        hidden = hidden.float()
        if spec.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = mask[..., None].float()
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
        return F.normalize(pooled, dim=-1).cpu()

    def _norm(self, hidden: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor]):
        return F.layer_norm(
            hidden, (self.spec.hidden_size,), weights[0], weights[1], self.spec.layer_norm_eps
        )


@dataclass
class _Job:
    inputs: list[list[int]]
    dimensions: int | None
    done: Callable[[torch.Tensor | Exception], None]
    rows: list[torch.Tensor | None] = field(default_factory=list)
    left: int = 0


class EmbeddingEngine:
    """Runs the encoder on its own thread over batches gathered from all waiting requests."""

    def __init__(self, encoder: BertEncoder, *, max_num_seqs: int, max_batch_tokens: int):
        self.encoder = encoder
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self._waiting: deque[tuple[_Job, int]] = deque()  # (job, input index)
        self._condition = threading.Condition()
        self._stopping = False

    def submit(self, inputs: list[list[int]], dimensions: int | None, done: Callable) -> None:
        """Embed `inputs`; `done` gets a float32 tensor [len(inputs), dims] (on the engine
        thread), or the exception the pass raised."""
        job = _Job(inputs, dimensions, done, [None] * len(inputs), len(inputs))
        with self._condition:
            self._waiting.extend((job, index) for index in range(len(inputs)))
            self._condition.notify()

    def stop(self) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify()

    def run_forever(self) -> None:
        while True:
            with self._condition:
                while not self._waiting and not self._stopping:
                    self._condition.wait()
                if self._stopping:
                    return
                batch = self._take_batch()
            self._run(batch)

    def _take_batch(self) -> list[tuple[_Job, int]]:
        """Waiting inputs, shortest first, while the padded batch fits the token budget."""
        ordered = sorted(self._waiting, key=lambda item: len(item[0].inputs[item[1]]))
        batch: list[tuple[_Job, int]] = []
        for item in ordered:
            length = len(item[0].inputs[item[1]])
            if batch and (
                len(batch) >= self.max_num_seqs or (len(batch) + 1) * length > self.max_batch_tokens
            ):
                break
            batch.append(item)
        taken = {id(item) for item in batch}
        self._waiting = deque(item for item in self._waiting if id(item) not in taken)
        return batch

    def _run(self, batch: list[tuple[_Job, int]]) -> None:
        try:
            vectors = self.encoder.encode([job.inputs[index] for job, index in batch])
        except Exception as error:  # one failed pass fails its requests, not the server
            logger.exception("an embedding pass failed")
            failed = {id(job): job for job, _ in batch}
            with self._condition:
                self._waiting = deque(item for item in self._waiting if id(item[0]) not in failed)
            for job in failed.values():
                job.done(error)
            return
        for (job, index), vector in zip(batch, vectors, strict=True):
            job.rows[index] = vector
            job.left -= 1
            if job.left == 0:
                result = torch.stack(job.rows)
                if job.dimensions is not None:
                    result = F.normalize(result[:, : job.dimensions], dim=-1)
                job.done(result)


@dataclass
class LoadedEncoder:
    """What the server holds for an embedding model (LoadedModel's counterpart)."""

    engine: EmbeddingEngine
    tokenizer: Any  # tokenizers.Tokenizer
    spec: EncoderSpec
    max_model_len: int

    task = "embed"


def load_embedding_model(
    folder: Path, *, device, dtype: torch.dtype, max_model_len: int | None, max_num_seqs: int
) -> LoadedEncoder:
    from tokenizers import Tokenizer

    spec = EncoderSpec.from_folder(folder)
    context = max_model_len or spec.max_position_embeddings
    if context > spec.max_position_embeddings:
        raise ValueError(
            f"--max-model-len {context} is over the model's {spec.max_position_embeddings} "
            "positions"
        )
    encoder = BertEncoder(spec, folder, dtype=dtype, device=device)
    encoder.encode([[0, 1, 2]])  # warm the kernels before the first request is timed
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    logger.info(
        "%s: a %d-layer encoder, %d dimensions, %s pooling, context %d",
        folder,
        spec.num_layers,
        spec.hidden_size,
        spec.pooling,
        context,
    )
    engine = EmbeddingEngine(
        encoder, max_num_seqs=max_num_seqs, max_batch_tokens=max(context, max_num_seqs * 128)
    )
    return LoadedEncoder(engine, tokenizer, spec, context)


# ---- the request ----


@dataclass(frozen=True)
class EmbeddingRequest:
    model: str
    inputs: list[list[int]]
    encoding_format: str
    dimensions: int | None

    @property
    def prompt_tokens(self) -> int:
        return sum(len(ids) for ids in self.inputs)


def parse_embedding_request(body: Any, model: LoadedEncoder, served_name: str) -> EmbeddingRequest:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise RequestError("`model` must be a non-empty string", param="model")
    unknown = sorted(set(body) - _KNOWN_FIELDS)
    if unknown:
        raise RequestError(
            f"`{unknown[0]}` is not supported by this server's embeddings API", param=unknown[0]
        )
    inputs = _inputs(body.get("input"), model)
    encoding_format = body.get("encoding_format")
    if encoding_format is None:
        encoding_format = "float"
    if encoding_format not in ENCODING_FORMATS:
        raise RequestError("`encoding_format` must be 'float' or 'base64'", param="encoding_format")
    dimensions = _dimensions(body.get("dimensions"), model.spec, served_name)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise RequestError("`user` must be a string", param="user")
    return EmbeddingRequest(name, inputs, encoding_format, dimensions)


def _inputs(value: Any, model: LoadedEncoder) -> list[list[int]]:
    if value is None:
        raise RequestError("you must provide `input`", param="input")
    if isinstance(value, str):
        items, where = [value], ["input"]
    elif isinstance(value, list) and value and all(_is_token(t) for t in value):
        items, where = [value], ["input"]  # one token array
    elif isinstance(value, list) and value:
        if len(value) > MAX_INPUTS:
            raise RequestError(
                f"`input` has {len(value)} items; at most {MAX_INPUTS} are allowed per request",
                param="input",
            )
        items, where = value, [f"input[{i}]" for i in range(len(value))]
    else:
        raise RequestError(
            "`input` must be a non-empty string, an array of strings, an array of token ids, "
            "or an array of token-id arrays",
            param="input",
        )
    encoded = []
    vocab = model.spec.vocab_size
    for item, param in zip(items, where, strict=True):
        if isinstance(item, str):
            if not item:
                raise RequestError(f"`{param}` must not be an empty string", param=param)
            ids = model.tokenizer.encode(item, add_special_tokens=True).ids
        elif isinstance(item, list) and item and all(_is_token(t) for t in item):
            bad = next((t for t in item if t >= vocab), None)
            if bad is not None:
                raise RequestError(
                    f"`{param}` holds token id {bad}; this model's vocabulary has {vocab}",
                    param=param,
                )
            ids = item
        else:
            raise RequestError(
                f"`{param}` must be a non-empty string or a non-empty array of token ids "
                "(non-negative integers)",
                param=param,
            )
        if len(ids) > model.max_model_len:
            raise RequestError(
                f"This model's maximum context length is {model.max_model_len} tokens. However, "
                f"`{param}` resulted in {len(ids)} tokens. Please reduce the length of the input.",
                param=param,
                code="context_length_exceeded",
            )
        encoded.append(ids)
    return encoded


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _dimensions(value: Any, spec: EncoderSpec, served_name: str) -> int | None:
    if value is None:
        return None
    if not _is_token(value) or value < 1:
        raise RequestError("`dimensions` must be a positive integer", param="dimensions")
    allowed = spec.matryoshka_dimensions
    if allowed is None:
        raise RequestError(
            f'Model "{served_name}" does not support matryoshka representation, changing output '
            "dimensions will lead to poor results.",
            param="dimensions",
        )
    if allowed and value not in allowed:
        raise RequestError(
            f'Model "{served_name}" only supports {list(allowed)} matryoshka dimensions; '
            f"`dimensions` is {value}.",
            param="dimensions",
        )
    if value > spec.hidden_size:
        raise RequestError(
            f"`dimensions` is {value}; this model's embeddings have {spec.hidden_size}",
            param="dimensions",
        )
    return None if value == spec.hidden_size else value


def embeddings_response(request: EmbeddingRequest, vectors: torch.Tensor, served_name: str) -> dict:
    """OpenAI's response: base64 is the little-endian float32 bytes of each vector."""
    if request.encoding_format == "base64":
        array = vectors.to(torch.float32).numpy().astype("<f4")
        encoded = [base64.b64encode(row.tobytes()).decode("ascii") for row in array]
    else:
        encoded = vectors.tolist()
    tokens = request.prompt_tokens
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": embedding}
            for index, embedding in enumerate(encoded)
        ],
        "model": served_name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


async def serve_embeddings(body: Any, model: LoadedEncoder, served_name: str):
    """(status, JSON body) for one POST /v1/embeddings."""
    try:
        request = parse_embedding_request(body, model, served_name)
    except RequestError as error:
        return error.status, error.body()
    if request.model != served_name:
        return 404, error_body(
            f"The model `{request.model}` does not exist; this server serves `{served_name}`.",
            "not_found_error",
            param="model",
            code="model_not_found",
        )
    loop = asyncio.get_running_loop()
    finished: asyncio.Future = loop.create_future()

    def done(result) -> None:
        loop.call_soon_threadsafe(_settle, finished, result)

    model.engine.submit(request.inputs, request.dimensions, done)
    result = await finished
    if isinstance(result, Exception):
        return 500, error_body(f"the embedding pass failed: {result}", "server_error")
    return 200, embeddings_response(request, result, served_name)


def _settle(future: asyncio.Future, result) -> None:
    if not future.done():
        future.set_result(result)
