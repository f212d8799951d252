"""Builtin runtime vs transformers' `generate`, one request at a time, on the tiny MoE.

    python bench/runtime.py [--model DIR] [--tokens 64] [--concurrency 1 4 16]

Measures, in one run on the same prompts: aggregate generated tokens/s and time to first token
(p50/p99) of the runtime server at each concurrency (closed loop: each client sends its next
request when the previous one ends; every request streams and generates exactly --tokens
tokens, ignore_eos), against `model.generate` run serially in this process (its TTFT is the
time to the first new token of each call). The systems take turns, never running at once, in
--rounds interleaved rounds; tokens/s is the median over rounds. The HTTP clients share the CPU
with the server. The last rows run the runtime's engine in this process, without HTTP: each
batch of `concurrency` requests submitted at once. All use --cpu-threads torch threads
(default 1).

Constrained decoding: at the highest concurrency, chat requests answering under a JSON schema
(ORDER_SCHEMA: nested objects, arrays, enums; response_format json_schema, strict) against the
same chat requests unconstrained (ignore_eos, so both run to about --tokens tokens), through
the server and through the engine alone; tokens/s counts the tokens each answer really had.
Prints a table and writes bench/results/runtime.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

SERVED_NAME = "tiny-moe"
TOPICS = [
    "the history of the harbour",
    "a recipe for bread",
    "why the sky is blue",
    "the rules of chess",
    "a trip to Lisbon",
    "how rivers form",
    "a letter to a friend",
    "the life of bees",
]


ORDER_SCHEMA = {
    "type": "object",
    "properties": {
        "customer": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "tier": {"enum": ["free", "pro"]}},
            "required": ["name", "tier"],
            "additionalProperties": False,
        },
        "lines": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string"},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                    "tags": {"type": "array", "items": {"enum": ["gift", "fragile", "bulk"]}},
                },
                "required": ["sku", "quantity", "tags"],
                "additionalProperties": False,
            },
        },
        "note": {"type": "string"},
    },
    "required": ["customer", "lines", "note"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "order", "strict": True, "schema": ORDER_SCHEMA},
}


def prompts(count: int) -> list[str]:
    return [f"Request {i}: write about {TOPICS[i % len(TOPICS)]}." for i in range(count)]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def serial_baseline(model_dir: Path, tokens: int):
    """A function running transformers' generate over prompts one at a time."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.calls = 0
            self.first_at = None

        def put(self, value):
            self.calls += 1
            if self.calls == 2 and self.first_at is None:  # call 1 is the prompt
                self.first_at = time.perf_counter()

        def end(self):
            pass

    def run(text: str, streamer=None) -> int:
        inputs = tokenizer(text, return_tensors="pt")
        output = model.generate(
            **inputs,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            streamer=streamer,
            pad_token_id=tokenizer.pad_token_id,
        )
        return output.shape[1] - inputs["input_ids"].shape[1]

    def measure(texts: list[str]) -> dict:
        ttfts, generated = [], 0
        started = time.perf_counter()
        for text in texts:
            streamer = FirstToken()
            call_started = time.perf_counter()
            generated += run(text, streamer)
            ttfts.append(streamer.first_at - call_started)
        elapsed = time.perf_counter() - started
        return _measurement(generated, elapsed, ttfts)

    run("warm-up")
    return measure


async def one_request(
    client: httpx.AsyncClient, url: str, text: str, tokens: int, mode: str = "completion"
):
    """mode: "completion" (/v1/completions), "chat", or "schema" (chat under ORDER_SCHEMA)."""
    body = {
        "model": SERVED_NAME,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if mode == "completion":
        body.update(prompt=text, ignore_eos=True)
    else:
        body["messages"] = [{"role": "user", "content": text}]
        if mode == "schema":
            body["response_format"] = RESPONSE_FORMAT
        else:
            body["ignore_eos"] = True
    path = "/v1/completions" if mode == "completion" else "/v1/chat/completions"
    started = time.perf_counter()
    first_at, generated = None, 0
    async with client.stream("POST", f"{url}{path}", json=body) as response:
        response.raise_for_status()
        # The client shares the CPU with the server: it parses only the first chunk (TTFT) and
        # the usage chunk, the one without choices.
        async for line in response.aiter_lines():
            if first_at is None and line.startswith("data: {"):
                first_at = time.perf_counter()
            elif '"choices": []' in line or '"choices":[]' in line:
                generated = json.loads(line[6:])["usage"]["completion_tokens"]
    return first_at - started, generated


async def closed_loop(
    url: str, texts: list[str], concurrency: int, tokens: int, mode: str = "completion"
) -> dict:
    pending = list(texts)
    ttfts, generated = [], 0

    async def client_loop(client):
        nonlocal generated
        while pending:
            text = pending.pop()
            ttft, count = await one_request(client, url, text, tokens, mode)
            ttfts.append(ttft)
            generated += count

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        await one_request(client, url, texts[0], 4, mode)  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return _measurement(generated, elapsed, ttfts)


def engine_in_process(model_dir: Path, max_num_seqs: int, tokens: int):
    """A function running the runtime's engine directly (no HTTP): `batch` requests at once."""
    from prometheus_client import CollectorRegistry

    from runtime.chat import output_spec
    from runtime.engine import SamplingParams
    from runtime.metrics import PrometheusListener
    from runtime.server import load_model

    loaded = load_model(
        str(model_dir),
        PrometheusListener(SERVED_NAME, CollectorRegistry()),
        device="cpu",
        dtype="auto",
        max_model_len=None,
        max_num_seqs=max_num_seqs,
        download_dir=Path(tempfile.gettempdir()),
    )
    engine = loaded.engine
    spec = output_spec({"response_format": RESPONSE_FORMAT})

    def measure(texts: list[str], mode: str | None = None) -> dict:
        """Plain prompts run to exactly `tokens` tokens; with `mode` "chat" the same as chat
        prompts, with "schema" chat prompts under ORDER_SCHEMA (compiling each request's
        grammar is part of the time)."""
        arrived, first, counts = {}, {}, {}
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=mode != "schema")
        started = time.perf_counter()
        for index, text in enumerate(texts):
            arrived[index] = time.perf_counter()

            def sink(event, index=index):
                first.setdefault(index, time.perf_counter())
                counts[index] = event.completion_tokens

            if mode is None:  # the text itself, as transformers' baseline gets it
                prompt_ids = loaded.tokenization.encode(text)
            else:  # a chat prompt, as the server's chat rows send it, schema or not
                prompt_ids = loaded.tokenization.render_chat([{"role": "user", "content": text}])
            constraint = loaded.grammars.constraint(spec) if mode == "schema" else None
            engine.submit(str(index), prompt_ids, params, sink, constraint)
        while engine.step():
            pass
        elapsed = time.perf_counter() - started
        ttfts = [first[i] - arrived[i] for i in range(len(texts))]
        return _measurement(sum(counts.values()), elapsed, ttfts)

    return measure


def _measurement(generated: int, elapsed: float, ttfts: list[float]) -> dict:
    return {"generated": generated, "seconds": elapsed, "ttfts": ttfts}


def summarize(name: str, concurrency: int, rounds: list[dict]) -> dict:
    """Median tokens/s over the rounds; TTFT percentiles over every request of every round."""
    ttfts = [t for r in rounds for t in r["ttfts"]]
    return {
        "system": name,
        "concurrency": concurrency,
        "requests": sum(len(r["ttfts"]) for r in rounds),
        "tokens_per_second": round(
            statistics.median(r["generated"] / r["seconds"] for r in rounds), 1
        ),
        "tokens_per_second_by_round": [round(r["generated"] / r["seconds"], 1) for r in rounds],
        "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1),
        "ttft_p99_ms": round(1000 * percentile(ttfts, 0.99), 1),
    }


def start_server(model_dir: Path, max_num_seqs: int, threads: int, log_path: Path):
    command = [
        sys.executable, "-m", "runtime", "serve", "--model", str(model_dir),
        "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", "0",
        "--device", "cpu", "--max-num-seqs", str(max_num_seqs), "--cpu-threads", str(threads),
    ]  # fmt: skip
    log = open(log_path, "wb")  # noqa: SIM115 (lives as long as the process)
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    url = None
    while time.monotonic() < deadline and process.poll() is None:
        found = re.search(r"serving \S+ on (http://[\d.]+:\d+)", log_path.read_text())
        if found:
            url = found.group(1)
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    return process, url
            except httpx.TransportError:
                pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"the runtime did not become ready:\n{log_path.read_text()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="Mixtral folder (default: build the tiny MoE)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--serial-requests", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--cpu-threads", type=int, default=1, help="torch threads, for the baseline and the server"
    )
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.cpu_threads)

    workdir = Path(tempfile.mkdtemp(prefix="bench-runtime-"))
    model_dir = args.model
    if model_dir is None:
        from runtime.tiny_moe import build_tiny_moe

        model_dir = build_tiny_moe(workdir / "tiny-moe")

    serial = serial_baseline(model_dir, args.tokens)
    process, url = start_server(
        model_dir, max(args.concurrency), args.cpu_threads, workdir / "runtime.log"
    )
    # Rounds interleave the systems, so that load from elsewhere on a shared machine falls on
    # all of them alike; each figure is the median over the rounds.
    engine = engine_in_process(model_dir, max(args.concurrency), args.tokens)
    measured: dict[int, list[dict]] = {0: []} | {c: [] for c in args.concurrency}
    in_process: dict[int, list[dict]] = {c: [] for c in args.concurrency}
    widest = max(args.concurrency)
    structured: dict[str, list[dict]] = {
        "chat": [],
        "schema": [],
        "engine_chat": [],
        "engine_schema": [],
    }
    try:
        for round_number in range(args.rounds):
            print(f"round {round_number + 1}/{args.rounds}", file=sys.stderr)
            measured[0].append(serial(prompts(args.serial_requests)))
            for concurrency in args.concurrency:
                texts = prompts(concurrency * args.requests_per_client)
                measured[concurrency].append(
                    asyncio.run(closed_loop(url, texts, concurrency, args.tokens))
                )
                in_process[concurrency].append(engine(prompts(concurrency)))
            texts = prompts(widest * args.requests_per_client)
            for mode in ("chat", "schema"):
                structured[mode].append(
                    asyncio.run(closed_loop(url, texts, widest, args.tokens, mode))
                )
                structured[f"engine_{mode}"].append(engine(prompts(widest), mode=mode))
    finally:
        process.terminate()
        process.wait(timeout=30)

    results = (
        [summarize("transformers generate, serial", 1, measured[0])]
        + [summarize("runtime server", c, measured[c]) for c in args.concurrency]
        + [summarize("runtime engine, no HTTP", c, in_process[c]) for c in args.concurrency]
        + [
            summarize("server chat", widest, structured["chat"]),
            summarize("server chat, JSON schema", widest, structured["schema"]),
            summarize("engine chat, no HTTP", widest, structured["engine_chat"]),
            summarize("engine JSON schema, no HTTP", widest, structured["engine_schema"]),
        ]
    )
    baseline = results[0]["tokens_per_second"]
    print(f"{'system':32} {'conc':>4} {'reqs':>4} {'tok/s':>8} {'x serial':>8} "
          f"{'TTFT p50 ms':>11} {'TTFT p99 ms':>11}")  # fmt: skip
    for row in results:
        row["speedup_vs_serial"] = round(row["tokens_per_second"] / baseline, 2)
        print(
            f"{row['system']:32} {row['concurrency']:>4} {row['requests']:>4} "
            f"{row['tokens_per_second']:>8.1f} {row['speedup_vs_serial']:>8.2f} "
            f"{row['ttft_p50_ms']:>11.1f} {row['ttft_p99_ms']:>11.1f}"
        )
    by_name = {row["system"]: row["tokens_per_second"] for row in results}
    constrained_cost = {
        "server": round(1 - by_name["server chat, JSON schema"] / by_name["server chat"], 3),
        "engine": round(
            1 - by_name["engine JSON schema, no HTTP"] / by_name["engine chat, no HTTP"], 3
        ),
    }
    print(
        f"JSON schema vs unconstrained at concurrency {widest}: "
        f"{100 * constrained_cost['server']:.1f}% slower through the server, "
        f"{100 * constrained_cost['engine']:.1f}% in the engine alone"
    )
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "tokens_per_request": args.tokens,
        "rounds": args.rounds,
        "cpu_threads": args.cpu_threads,
        "results": results,
        "json_schema_slowdown_at_widest_concurrency": constrained_cost,
        "load_average": os.getloadavg(),
    }
    out = REPO_ROOT / "bench" / "results" / "runtime.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
