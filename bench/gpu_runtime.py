"""Decode throughput of the builtin runtime on one GPU, full-size Mixtral-8x7B architecture.

    python3 bench/gpu_runtime.py [--out DIR]          # on the GPU machine (one H200)
    python bench/gpu_runtime.py --dry-run             # a small Mixtral shape on CPU, to test it

The GPU image has torch and transformers but no starlette or uvicorn; carry their wheels (see
docs/benchmarks.md for the exact commands) or the HTTP part is skipped.

Random bf16 weights are made directly on the GPU (nothing is downloaded). Measures decode steps/s
of our engine (`Engine.step`, sampling and detokenization included) at batch 1 and 32, eager and
with CUDA graphs, against the memory-bandwidth bound: the bytes of weights and KV cache one step
must read, over the device-to-device copy bandwidth measured here. Then the same engine behind
the HTTP server (when starlette and uvicorn import) with 1 and 32 concurrent streaming clients.
Writes gpu_runtime.json into --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from runtime.block_manager import SCRATCH_BLOCK  # noqa: E402
from runtime.engine import Engine, SamplingParams  # noqa: E402
from runtime.model import MixtralRunner, ModelSpec, random_mixtral  # noqa: E402
from runtime.tiny_moe import build_tiny_moe  # noqa: E402

MIXTRAL_8X7B = ModelSpec(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    num_experts=8,
    experts_per_token=2,
    rms_norm_eps=1e-5,
    rope_theta=1e6,
    max_position_embeddings=32768,
)
SMALL_MIXTRAL_SHAPE = ModelSpec(
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=512,
    num_layers=2,
    num_heads=8,
    num_kv_heads=2,
    head_dim=32,
    num_experts=8,
    experts_per_token=2,
    rms_norm_eps=1e-5,
    rope_theta=1e6,
    max_position_embeddings=4096,
)
PROMPT_TOKENS = 32


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read and written."""
    if device.type != "cuda":
        return float("nan")
    source = torch.empty(2 * 1024**3, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(10):
        target.copy_(source)
    synchronize(device)
    elapsed = time.perf_counter() - started
    del source, target
    return 10 * 2 * 2 * 1024**3 / elapsed


def bytes_per_step(spec: ModelSpec, batch: int, context: int, element: int) -> int:
    """Weights and KV cache a decode step reads at this batch (experts: expected distinct)."""
    hidden, inter = spec.hidden_size, spec.intermediate_size
    attention = hidden * spec.head_dim * (2 * spec.num_heads + 2 * spec.num_kv_heads)
    unused = (1 - spec.experts_per_token / spec.num_experts) ** batch  # chance an expert idles
    experts = spec.num_experts * (1 - unused) * 3 * hidden * inter
    per_layer = attention + experts + spec.num_experts * hidden
    weights = spec.num_layers * per_layer + spec.vocab_size * hidden + batch * hidden
    kv = batch * spec.num_layers * 2 * spec.num_kv_heads * context * spec.head_dim
    return int((weights + kv) * element)


def measure_engine(runner: MixtralRunner, decode, batch: int, steps: int, warmup: int) -> dict:
    """Steady-state decode steps/s of Engine.step with `batch` sequences running."""
    engine = Engine(runner, decode, eos_token_ids=[])
    events: list = []
    generator = torch.Generator().manual_seed(batch)
    for index in range(batch):
        prompt = torch.randint(0, 500, (PROMPT_TOKENS,), generator=generator).tolist()
        params = SamplingParams(max_tokens=warmup + steps + 2, temperature=0, ignore_eos=True)
        engine.submit(f"bench-{batch}-{index}", prompt, params, events.append)
    engine.step()  # admits (prefills) every request and runs the first decode step
    assert engine.num_running == batch, engine.num_running
    for _ in range(warmup):
        engine.step()
    synchronize(runner.device)
    started = time.perf_counter()
    for _ in range(steps):
        engine.step()
    synchronize(runner.device)
    elapsed = time.perf_counter() - started
    while engine.step():  # finish the requests so every cache block is free again
        pass
    steps_per_second = steps / elapsed
    return {
        "batch": batch,
        "steps": steps,
        "ms_per_step": round(1000 * elapsed / steps, 2),
        "steps_per_second": round(steps_per_second, 1),
        "tokens_per_second": round(batch * steps_per_second, 1),
    }


def measure_http(runner: MixtralRunner, tokenizer_dir: Path, decode, tokens: int) -> list[dict]:
    import httpx
    import uvicorn
    from transformers import AutoTokenizer

    from runtime.protocol import Tokenization
    from runtime.server import LoadedModel, create_app

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    def load(listener):
        engine = Engine(runner, decode, eos_token_ids=[], listener=listener)
        return LoadedModel(
            engine=engine, tokenization=Tokenization(tokenizer, runner.max_model_len)
        )

    app = create_app(served_model_name="mixtral-8x7b-random", load_model=load)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the HTTP server did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    while httpx.get(f"{url}/health").status_code != 200:
        time.sleep(0.1)

    async def one(client, index):
        body = {
            "model": "mixtral-8x7b-random",
            "prompt": f"Request {index}: tell me about the sea.",
            "max_tokens": tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        started = time.perf_counter()
        first, generated = None, 0
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk["choices"] and first is None:
                    first = time.perf_counter() - started
                if chunk.get("usage"):
                    generated = chunk["usage"]["completion_tokens"]
        return first, generated

    async def run(concurrency):
        async with httpx.AsyncClient(timeout=300) as client:
            await one(client, -1)
            started = time.perf_counter()
            results = await asyncio.gather(*(one(client, i) for i in range(concurrency)))
            elapsed = time.perf_counter() - started
        ttfts = sorted(r[0] for r in results)
        return {
            "concurrency": concurrency,
            "tokens_per_second": round(sum(r[1] for r in results) / elapsed, 1),
            "ttft_p50_ms": round(1000 * ttfts[len(ttfts) // 2], 1),
            "ttft_max_ms": round(1000 * ttfts[-1], 1),
        }

    try:
        return [asyncio.run(run(c)) for c in (1, runner.max_num_seqs)]
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="small Mixtral shape on CPU")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--http-tokens", type=int, default=64)
    args = parser.parse_args()

    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    spec = SMALL_MIXTRAL_SHAPE if args.dry_run else MIXTRAL_8X7B
    report: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
        "model": "Mixtral-8x7B architecture, random weights" if not args.dry_run else "small",
        "dtype": str(dtype),
        "total_parameters": spec.total_parameters,
        "active_parameters_per_token": spec.active_parameters_per_token,
        "max_model_len": args.max_model_len,
    }
    log(f"{report['device']}, torch {torch.__version__}")
    bandwidth = copy_bandwidth(device)
    report["copy_bandwidth_tb_s"] = round(bandwidth / 1e12, 2)
    log(f"device-to-device copy bandwidth {bandwidth / 1e12:.2f} TB/s")

    started = time.perf_counter()
    weights = random_mixtral(spec, dtype=dtype, device=device)
    synchronize(device)
    report["weights_seconds"] = round(time.perf_counter() - started, 1)
    log(f"{spec.total_parameters / 1e9:.1f}B random parameters in {report['weights_seconds']}s")

    tokenizer_dir = build_tiny_moe(Path(tempfile.mkdtemp()) / "tokenizer")
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))

    def decode(token_ids):
        return backend.decode(token_ids, skip_special_tokens=True)

    runner = MixtralRunner(
        spec,
        weights,
        max_num_seqs=args.batch,
        max_model_len=args.max_model_len,
        batch_invariant=False,
    )
    runner.prefill([SCRATCH_BLOCK], list(range(8)))
    runner.decode([1], [8], [[SCRATCH_BLOCK]])
    element = torch.finfo(dtype).bits // 8
    results = []

    def run_mode(mode: str) -> None:
        for batch in (1, args.batch):
            row = measure_engine(runner, decode, batch, args.steps, warmup=4)
            context = runner._attend_len(PROMPT_TOKENS + 8 + args.steps)
            step_bytes = bytes_per_step(spec, batch, context, element)
            row.update(
                mode=mode,
                gb_read_per_step=round(step_bytes / 1e9, 1),
                bound_steps_per_second=round(bandwidth / step_bytes, 1),
                achieved_bandwidth_tb_s=round(step_bytes * row["steps_per_second"] / 1e12, 2),
            )
            row["fraction_of_bound"] = round(
                row["steps_per_second"] / row["bound_steps_per_second"], 3
            )
            results.append(row)
            log(json.dumps(row))

    run_mode("eager")
    if device.type == "cuda":
        try:
            started = time.perf_counter()
            graphs = runner.capture_cuda_graphs()
            report["cuda_graphs"] = graphs
            report["cuda_graph_capture_seconds"] = round(time.perf_counter() - started, 1)
            log(f"captured {graphs} CUDA graphs in {report['cuda_graph_capture_seconds']}s")
            run_mode("cuda graphs")
        except Exception as error:  # report what we have rather than nothing
            report["cuda_graph_error"] = f"{type(error).__name__}: {error}"
            log(f"CUDA graphs failed: {report['cuda_graph_error']}")
    report["engine"] = results

    try:
        report["http"] = measure_http(runner, tokenizer_dir, decode, args.http_tokens)
        for row in report["http"]:
            log(f"http {json.dumps(row)}")
    except ImportError as error:
        report["http_skipped"] = f"{error}"
        log(f"HTTP check skipped: {error}")
    if device.type == "cuda":
        report["max_memory_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 1)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_runtime.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.out / 'gpu_runtime.json'}")


if __name__ == "__main__":
    main()
