"""The OpenAI-compatible HTTP server: Starlette on uvicorn, the engine on its own thread.

The socket is served at once and the model loads in the background: until it is ready `/health`
and the API answer 503 (with Retry-After), so a pod's readiness probe and the gateway both wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from runtime.embeddings import (
    LoadedEncoder,
    is_embedding_checkpoint,
    load_embedding_model,
    serve_embeddings,
)
from runtime.engine import FINISH_ERROR, Engine, GenerationEvent, SamplingParams, TokenLogprob
from runtime.metrics import PrometheusListener
from runtime.protocol import (
    ParsedRequest,
    RequestError,
    Tokenization,
    chat_logprobs,
    completion_id,
    completion_logprobs,
    error_body,
    finish_reason,
    full_choice,
    full_response,
    parse_chat_request,
    parse_completion_request,
    stream_chunk,
    usage,
)
from runtime.schemas import InvalidRequest
from runtime.structured import AnswerReader, Constraint, Grammars

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 5
# Compiling a request's grammar runs on these threads, never on the event loop nor the engine's
# thread; llguidance's fuel limits bound each compile (runtime/structured.py), and this bounds
# the wait for one when the threads are busy with others.
GRAMMAR_THREADS = 2
GRAMMAR_COMPILE_SECONDS = 10.0


@dataclass
class LoadedModel:
    engine: Engine
    tokenization: Tokenization
    grammars: Grammars | None = None  # None: this model refuses tools and response_format

    task = "generate"  # an embedding model is a runtime.embeddings.LoadedEncoder ("embed")

    @property
    def max_model_len(self) -> int:
        return self.tokenization.max_model_len


class EventRelay:
    """Hands engine events to asyncio queues with one event-loop wakeup per burst.

    The engine thread emits an event per running request per step; waking the loop for each
    one (a self-pipe write and a context switch apiece) costs more than the step at batch 16.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: list[tuple[Callable, GenerationEvent]] = []
        self.scheduled = False

    def sink(self, deliver: Callable[[GenerationEvent], None]) -> Callable[[GenerationEvent], None]:
        """A sink for `Engine.submit` whose events reach `deliver` on the event loop."""

        def post(event: GenerationEvent) -> None:
            with self.lock:
                self.pending.append((deliver, event))
                if self.scheduled:
                    return
                self.scheduled = True
            # A RuntimeError means the loop has shut down: nobody is listening any more.
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._drain)

        return post

    def _drain(self) -> None:
        with self.lock:
            batch, self.pending, self.scheduled = self.pending, [], False
        for deliver, event in batch:
            deliver(event)


class RuntimeState:
    def __init__(self, served_model_name: str):
        self.served_model_name = served_model_name
        self.model: LoadedModel | None = None
        self.load_error: str | None = None
        self.created = int(time.time())
        self.registry = CollectorRegistry()
        self.listener = PrometheusListener(served_model_name, self.registry)
        self.engine_thread: threading.Thread | None = None
        self.relay: EventRelay | None = None
        self.grammar_pool = ThreadPoolExecutor(GRAMMAR_THREADS, thread_name_prefix="grammar")


def create_app(
    *,
    served_model_name: str,
    load_model: Callable[[PrometheusListener], LoadedModel],
    on_load_failure: Callable[[], None] = lambda: None,
) -> Starlette:
    """The ASGI app; `load_model` runs on a background thread once the server is up."""
    state = RuntimeState(served_model_name)

    def load_in_background() -> None:
        try:
            started = time.monotonic()
            model = load_model(state.listener)
            state.engine_thread = threading.Thread(
                target=model.engine.run_forever, name="engine", daemon=True
            )
            state.engine_thread.start()
            state.model = model
            logger.info("model %s ready in %.1fs", served_model_name, time.monotonic() - started)
        except Exception as error:
            logger.exception("loading the model failed")
            state.load_error = f"{type(error).__name__}: {error}"
            on_load_failure()

    @asynccontextmanager
    async def lifespan(app: Starlette):
        state.relay = EventRelay(asyncio.get_running_loop())
        threading.Thread(target=load_in_background, name="model-loader", daemon=True).start()
        yield
        if state.model is not None:
            state.model.engine.stop()
            state.engine_thread.join(timeout=10)
        state.grammar_pool.shutdown(wait=False, cancel_futures=True)

    async def health(request: Request) -> Response:
        if state.model is not None:
            return JSONResponse({"status": "ready"})
        if state.load_error is not None:
            return JSONResponse({"status": "failed", "error": state.load_error}, status_code=503)
        return JSONResponse(
            {"status": "loading"},
            status_code=503,
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)

    async def list_models(request: Request) -> Response:
        model = state.model
        if model is None:
            return _unavailable(state)
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": served_model_name,
                        "object": "model",
                        "created": state.created,
                        "owned_by": "sirocco",
                        "max_model_len": model.max_model_len,
                    }
                ],
            }
        )

    async def chat_completions(request: Request) -> Response:
        return await _generate(request, state, parse_chat_request)

    async def completions(request: Request) -> Response:
        return await _generate(request, state, parse_completion_request)

    async def embeddings(request: Request) -> Response:
        model = state.model
        if model is None:
            return _unavailable(state)
        if model.task != "embed":
            return _wrong_task(state, "Embeddings", "/v1/chat/completions or /v1/completions")
        try:
            body = json.loads(await request.body())
        except ValueError:
            return JSONResponse(
                error_body("the request body is not valid JSON", "invalid_request_error"),
                status_code=400,
            )
        status, payload = await serve_embeddings(body, model, state.served_model_name)
        return JSONResponse(payload, status_code=status)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(error_body(message, kind), status_code=exc.status_code)

    async def server_error(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s", request.url.path, exc_info=exc)
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)

    app = Starlette(
        routes=[
            Route("/health", health),
            Route("/metrics", metrics),
            Route("/v1/models", list_models),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
        ],
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error, Exception: server_error},
    )
    app.state.runtime = state
    return app


def _unavailable(state: RuntimeState) -> Response:
    message = (
        f"the model failed to load: {state.load_error}"
        if state.load_error
        else "the model is still loading; retry shortly"
    )
    return JSONResponse(
        error_body(message, "service_unavailable", code="model_not_ready"),
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def _wrong_task(state: RuntimeState, api: str, instead: str) -> Response:
    return JSONResponse(
        error_body(
            f"The model `{state.served_model_name}` does not support the {api} API; use {instead}.",
            "invalid_request_error",
            param="model",
            code="unsupported_model_task",
        ),
        status_code=400,
    )


async def _generate(request: Request, state: RuntimeState, parse) -> Response:
    model = state.model
    if model is None:
        return _unavailable(state)
    if model.task != "generate":
        return _wrong_task(state, "Completions", "/v1/embeddings (it is an embedding model)")
    try:
        body = json.loads(await request.body())
    except ValueError:
        return JSONResponse(
            error_body("the request body is not valid JSON", "invalid_request_error"),
            status_code=400,
        )
    try:
        parsed: ParsedRequest = parse(body, model.tokenization)
    except RequestError as error:
        return JSONResponse(error.body(), status_code=error.status)
    if parsed.model != state.served_model_name:
        return JSONResponse(
            error_body(
                f"The model `{parsed.model}` does not exist; this server serves "
                f"`{state.served_model_name}`.",
                "not_found_error",
                param="model",
                code="model_not_found",
            ),
            status_code=404,
        )
    constraints: list[Constraint | None] = [None] * parsed.n
    if parsed.output.constrained:
        try:  # one grammar state per choice
            constraints = list(
                await asyncio.gather(*(_compile(state, model, parsed) for _ in range(parsed.n)))
            )
        except RequestError as error:
            return JSONResponse(error.body(), status_code=error.status)
    request_id = completion_id(parsed.chat)
    choices = _choices(request_id, parsed, constraints)
    if parsed.stream:
        events: asyncio.Queue[tuple[int, GenerationEvent]] = asyncio.Queue()
        for choice in choices:
            deliver = functools.partial(_put_choice_event, events, choice.index)
            model.engine.submit(
                choice.engine_id,
                parsed.prompt_ids,
                choice.params,
                state.relay.sink(deliver),
                choice.constraint,
            )
        return StreamingResponse(
            _stream(model, request_id, parsed, state.served_model_name, events, choices),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Request-Id": request_id},
        )
    return await _complete(request, state, model, request_id, parsed, choices)


@dataclass
class _Choice:
    """One of a request's `n` choices: its own engine request, seed and grammar state."""

    index: int
    engine_id: str
    params: SamplingParams
    constraint: Constraint | None
    parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)


def _choices(request_id: str, parsed: ParsedRequest, constraints) -> list[_Choice]:
    """The engine requests of a request's choices. With a seed, choice i samples with seed + i
    (vLLM's rule), so the choices differ and the request stays reproducible."""
    choices = []
    for index, constraint in enumerate(constraints):
        params = parsed.params
        if index and params.seed is not None:
            params = dataclasses.replace(params, seed=(params.seed + index) % 2**64)
        engine_id = request_id if parsed.n == 1 else f"{request_id}-{index}"
        choices.append(_Choice(index, engine_id, params, constraint))
    return choices


def _put_choice_event(events: asyncio.Queue, index: int, event: GenerationEvent) -> None:
    events.put_nowait((index, event))


async def _compile(state: RuntimeState, model: LoadedModel, parsed: ParsedRequest) -> Constraint:
    """The request's grammar, compiled on a grammar thread within GRAMMAR_COMPILE_SECONDS."""
    param = "tools" if parsed.output.calls_tools else "response_format"
    if model.grammars is None:
        raise RequestError(f"{param} is not supported by this model", param=param)
    loop = asyncio.get_running_loop()
    work = loop.run_in_executor(state.grammar_pool, model.grammars.constraint, parsed.output)
    try:
        async with asyncio.timeout(GRAMMAR_COMPILE_SECONDS):
            return await work
    except TimeoutError:
        raise RequestError(
            f"the {param} schema took over {GRAMMAR_COMPILE_SECONDS:g}s to compile into a "
            "grammar; simplify it",
            param=param,
        ) from None
    except InvalidRequest as error:
        raise RequestError(error.message, param=error.param) from None


async def _complete(
    request: Request,
    state: RuntimeState,
    model: LoadedModel,
    request_id: str,
    parsed: ParsedRequest,
    choices: list[_Choice],
) -> Response:
    # Text accumulates on the engine thread; the event loop hears only of each choice's end.
    loop = asyncio.get_running_loop()
    ends: list[asyncio.Future[GenerationEvent]] = [loop.create_future() for _ in choices]
    engine = model.engine
    for choice, end in zip(choices, ends, strict=True):
        relay_end = state.relay.sink(functools.partial(_resolve, end))

        def sink(event: GenerationEvent, choice=choice, relay_end=relay_end) -> None:
            choice.parts.append(event.text)
            choice.logprobs.extend(event.logprobs)
            if event.finish_reason is not None:
                relay_end(event)

        engine.submit(choice.engine_id, parsed.prompt_ids, choice.params, sink, choice.constraint)
    finished = asyncio.gather(*ends)
    disconnected = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({finished, disconnected}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnected.cancel()
    if not finished.done():
        for choice in choices:
            engine.cancel(choice.engine_id)  # the client went away: free its rows now
        finished.cancel()
        return Response(status_code=499)
    events = finished.result()
    failed = next((e for e in events if e.finish_reason == FINISH_ERROR), None)
    if failed is not None:
        return JSONResponse(
            error_body(f"generation failed: {failed.error}", "server_error"), status_code=500
        )
    token_text = model.tokenization.token_text
    answers = []
    for choice, event in zip(choices, events, strict=True):
        reader = AnswerReader(parsed.output, choice.constraint)
        answer = reader.feed("".join(choice.parts)) + reader.finish()
        text = "".join(piece for kind, piece in answer if kind == "content")
        tool_calls = reader.calls.tool_calls() if reader.called else None
        logprobs = None
        if choice.params.logprobs is not None:
            logprobs = (
                chat_logprobs(choice.logprobs, model.tokenization)
                if parsed.chat
                else completion_logprobs(choice.logprobs, token_text, 0)
            )
        answers.append(
            full_choice(
                parsed,
                choice.index,
                text,
                finish_reason(parsed.output, event.finish_reason, bool(tool_calls)),
                tool_calls,
                logprobs,
            )
        )
    first = events[0]
    total = usage(
        first.prompt_tokens, sum(e.completion_tokens for e in events), first.cached_tokens
    )
    return JSONResponse(
        full_response(parsed, request_id, state.served_model_name, answers, total),
        headers={"X-Request-Id": request_id},
    )


async def _stream(
    model: LoadedModel,
    request_id: str,
    parsed: ParsedRequest,
    model_name: str,
    events: asyncio.Queue[tuple[int, GenerationEvent]],
    choices: list[_Choice],
) -> AsyncIterator[str]:
    created = int(time.time())
    readers = [AnswerReader(parsed.output, choice.constraint) for choice in choices]
    # Logprobs of tokens whose text has not gone out yet, and each choice's text offset.
    pending: list[list[TokenLogprob]] = [[] for _ in choices]
    offsets = [0] * len(choices)
    last: dict[int, GenerationEvent] = {}  # each finished choice's final event
    token_text = model.tokenization.token_text
    wants_logprobs = parsed.params.logprobs is not None

    def chunk(**fields) -> str:
        payload = stream_chunk(parsed, request_id, model_name, created, **fields)
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def take_logprobs(index: int) -> dict | None:
        if not wants_logprobs or not pending[index]:
            return None
        entries, pending[index] = pending[index], []
        if parsed.chat:
            return chat_logprobs(entries, model.tokenization)
        logprobs = completion_logprobs(entries, token_text, offsets[index])
        offsets[index] += sum(len(token) for token in logprobs["tokens"])
        return logprobs

    try:
        if parsed.chat:
            for choice in choices:
                yield chunk(
                    role=True,
                    text="",
                    index=choice.index,
                    usage_so_far=usage(len(parsed.prompt_ids), 0),
                )
        while len(last) < len(choices):
            burst = [await events.get()]
            while not events.empty():  # the client fell behind: send what piled up at once
                burst.append(events.get_nowait())
            for index, text, event in _merge_by_choice(burst):
                pending[index].extend(e for e in _logprobs_of(burst, index))
                if event.finish_reason == FINISH_ERROR:
                    last[index] = event
                    error = error_body(f"generation failed: {event.error}", "server_error")
                    yield f"data: {json.dumps(error)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                so_far = usage(event.prompt_tokens, event.completion_tokens, event.cached_tokens)
                done = event.finish_reason is not None
                if parsed.chat:
                    reader = readers[index]
                    pieces = reader.feed(text) + (reader.finish() if done else [])
                    for kind, piece in pieces:
                        field_name = "text" if kind == "content" else "tool_call"
                        yield chunk(
                            **{field_name: piece},  # one tool_calls delta per chunk, as OpenAI
                            index=index,
                            usage_so_far=so_far,
                            logprobs=take_logprobs(index),
                        )
                    if done:
                        reason = finish_reason(parsed.output, event.finish_reason, reader.called)
                        yield chunk(
                            finish_reason=reason,
                            index=index,
                            usage_so_far=so_far,
                            logprobs=take_logprobs(index),
                        )
                elif text or done:
                    yield chunk(
                        text=text,
                        finish_reason=event.finish_reason,
                        index=index,
                        usage_so_far=so_far,
                        logprobs=take_logprobs(index),
                    )
                if done:
                    last[index] = event
        if parsed.include_usage:
            first = last[0]
            completion_tokens = sum(event.completion_tokens for event in last.values())
            yield chunk(usage_=usage(first.prompt_tokens, completion_tokens, first.cached_tokens))
        yield "data: [DONE]\n\n"
    finally:
        for choice in choices:
            if choice.index not in last:
                model.engine.cancel(choice.engine_id)  # the client disconnected mid-stream


def _merge_by_choice(burst: list[tuple[int, GenerationEvent]]):
    """(index, text, last event) per choice in a burst of events, in order of first arrival:
    a choice's events since the previous burst become one."""
    merged: dict[int, tuple[str, GenerationEvent]] = {}
    for index, event in burst:
        text = merged[index][0] if index in merged else ""
        merged[index] = (text + event.text, event)
    return [(index, text, event) for index, (text, event) in merged.items()]


def _logprobs_of(burst: list[tuple[int, GenerationEvent]], index: int):
    for event_index, event in burst:
        if event_index == index:
            yield from event.logprobs


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


# ---- `python -m runtime serve` ----


def load_model(
    model: str,
    listener: PrometheusListener,
    *,
    device: str,
    dtype: str,
    max_model_len: int | None,
    max_num_seqs: int,
    download_dir: Path,
    cuda_graphs: bool = True,
    block_size: int = 16,
    num_blocks: int | None = None,
    enable_prefix_caching: bool = True,
) -> LoadedModel | LoadedEncoder:
    import torch

    from runtime.block_manager import SCRATCH_BLOCK
    from runtime.loader import resolve_model
    from runtime.model import MixtralRunner, load_mixtral
    from runtime.tokenizer import ChatTokenizer

    torch_device = torch.device(device)
    torch_dtype = _torch_dtype(dtype, torch_device)
    folder = resolve_model(model, cache_dir=download_dir)
    if is_embedding_checkpoint(folder):
        return load_embedding_model(
            folder,
            device=torch_device,
            dtype=torch_dtype,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
        )
    spec, weights = load_mixtral(folder, dtype=torch_dtype, device=torch_device)
    tokenizer = ChatTokenizer(folder)  # not transformers: its import alone costs a second
    context = max_model_len or spec.max_position_embeddings
    if context > spec.max_position_embeddings:
        raise ValueError(
            f"--max-model-len {context} is over the model's "
            f"{spec.max_position_embeddings} positions"
        )
    runner = MixtralRunner(
        spec,
        weights,
        max_num_seqs=max_num_seqs,
        max_model_len=context,
        batch_invariant=torch_device.type == "cpu",
        num_blocks=num_blocks,
        block_size=block_size,
    )
    logger.info(
        "%s on %s in %s: %.1fM parameters, KV cache %.1f MB in %d blocks of %d tokens "
        "(prefix caching %s), up to %d sequences of %d tokens",
        folder,
        torch_device,
        torch_dtype,
        spec.total_parameters / 1e6,
        runner.kv_cache_bytes / 1e6,
        runner.num_blocks,
        block_size,
        "on" if enable_prefix_caching else "off",
        max_num_seqs,
        context,
    )
    eos_token_ids = set()
    # Read as JSON: transformers' GenerationConfig imports its generation package (a second).
    generation_path = folder / "generation_config.json"
    if generation_path.is_file():
        eos = json.loads(generation_path.read_text()).get("eos_token_id")
        eos_token_ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        eos_token_ids.add(tokenizer.eos_token_id)
    backend = tokenizer.backend_tokenizer

    def decode(token_ids: list[int]) -> str:
        return backend.decode(token_ids, skip_special_tokens=True)

    grammars = Grammars(tokenizer.backend_tokenizer, tokenizer.eos_token_id, spec.vocab_size)
    # Warm the kernels before the first request is timed (in the scratch block, which no
    # sequence holds).
    runner.prefill([SCRATCH_BLOCK], [0, 1, 2])
    runner.decode([0], [3], [[SCRATCH_BLOCK]])
    if cuda_graphs and torch_device.type == "cuda":
        started = time.monotonic()
        count = runner.capture_cuda_graphs()
        logger.info("captured %d CUDA graphs in %.1fs", count, time.monotonic() - started)
    engine = Engine(
        runner,
        decode,
        eos_token_ids,
        enable_prefix_caching=enable_prefix_caching,
        listener=listener,
    )
    return LoadedModel(
        engine=engine, tokenization=Tokenization(tokenizer, context), grammars=grammars
    )


def _torch_dtype(name: str, device):
    import torch

    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    return dtypes[name]


def serve(args) -> int:
    import uvicorn

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    served_model_name = args.served_model_name or Path(args.model.rstrip("/")).name
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    server: uvicorn.Server | None = None

    def stop_server() -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(
        served_model_name=served_model_name,
        load_model=lambda listener: load_model(
            args.model,
            listener,
            device=args.device,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            download_dir=args.download_dir,
            cuda_graphs=not args.enforce_eager,
            block_size=args.block_size,
            num_blocks=args.num_gpu_blocks_override,
            enable_prefix_caching=args.enable_prefix_caching,
        ),
        on_load_failure=stop_server,
    )
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level=args.log_level,
            access_log=args.access_log,
            timeout_graceful_shutdown=5,
        )
    )
    host, port = sock.getsockname()[:2]
    logger.info("serving %s on http://%s:%d", served_model_name, host, port)
    server.run(sockets=[sock])
    return 1 if app.state.runtime.load_error else 0
