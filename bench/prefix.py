"""Prompt caching end to end: a multi-turn chat workload through the gateway to a deployment of
builtin runtime replicas, in three configurations:

1. least in-flight routing, prefix caching off (`--no-enable-prefix-caching` on every replica);
2. prefix caching on, least in-flight routing;
3. prefix caching on, prefix-aware routing (the deployment's default `routing_policy`).

    python bench/prefix.py [--replicas 2] [--conversations 32] [--turns 4]
        [--system-tokens 1500] [--max-tokens 16] [--think-time 0.5] [--json out.json]

Every conversation shares one system prompt of `--system-tokens` tokens (the tiny MoE's
tokenizer) and grows turn by turn: each turn sends the whole history plus a new user message
and streams the answer back; all conversations run at once, each one turn after the other with
a user's pause before every turn (exponential, mean `--think-time` seconds, the same pauses in
every configuration), as vLLM's multi-turn benchmark does. `--think-time 0` sends every turn the
instant the previous answer ends: the conversations then move in lockstep and each turn reaches
a replica as one burst, the hardest case for time to first token.
Each configuration starts fresh replicas (empty caches) and a fresh gateway. Reports, per
configuration: time to first token p50/p99 (client side, to the first streamed text), generated
tokens/s over the whole run, and the prefix-cache hit rate (cached / prompt tokens, as the
replicas report `usage.prompt_tokens_details.cached_tokens`; the replicas' own
`vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total` agree), and the gateway's
routing decisions.

Everything runs on this machine: the gateway (one uvicorn process over a SQLite file, as the
embedded default), the replicas (`python -m runtime serve`, the tiny MoE on CPU, one thread
each) and the client. The tiny MoE's context is 2,048 tokens, which bounds system prompt plus
history.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.gateway import free_port, start, stop, wait_http  # noqa: E402
from runtime.tiny_moe import TINY, MoeShape, build_tiny_moe  # noqa: E402

SERVED = "tiny-moe"
MODEL = "chat"
HUGE_LIMIT = 2_000_000_000
WORDS = [
    "support",
    "assistant",
    "bicycle",
    "shop",
    "customer",
    "order",
    "refund",
    "shipping",
    "warranty",
    "brake",
    "chain",
    "wheel",
    "tyre",
    "pedal",
    "saddle",
    "frame",
    "gear",
    "cable",
    "helmet",
    "light",
    "lock",
    "pump",
    "invoice",
    "delivery",
    "return",
    "policy",
    "always",
    "never",
    "politely",
    "explain",
    "check",
    "ask",
    "confirm",
    "before",
    "after",
    "store",
    "online",
    "phone",
    "email",
]

SEED = """
from accounts.actors import Actor
from accounts.models import APIKey, Organization
from accounts.services import api_key_create
from tests.deployments.factories import DeploymentFactory
organization = Organization.objects.create(slug="bench", name="Bench")
DeploymentFactory(
    organization=organization, name={model!r}, model_version__served_model_name={served!r},
    model_version__runtime_args={{"max_model_len": 32768}},
)
_key, secret = api_key_create(
    actor=Actor.system(organization), name="bench", scopes=[APIKey.Scope.INFERENCE],
    rpm_limit={limit}, tpm_limit={limit},
)
print(secret)
"""

CONFIGURE = """
from deployments.models import Deployment, Replica
deployment = Deployment.objects.get(name={model!r})
Deployment.objects.filter(pk=deployment.pk).update(routing_policy={policy!r})
Replica.objects.filter(deployment=deployment).delete()
for index, endpoint in enumerate({endpoints!r}):
    Replica.objects.create(
        deployment=deployment, name=f"replica-{{index}}", endpoint=endpoint, ready=True,
        phase=Replica.Phase.READY,
    )
"""

CONFIGURATIONS = (
    ("least in-flight, no prefix caching", "least_in_flight", False),
    ("prefix caching, least in-flight", "least_in_flight", True),
    ("prefix caching, prefix-aware routing", "prefix_aware", True),
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def system_prompt(tokenizer, tokens: int) -> str:
    """Deterministic words until the tiny MoE's tokenizer counts `tokens` tokens."""
    rng = random.Random(19)
    words: list[str] = []
    while True:
        words.extend(rng.choice(WORDS) for _ in range(20))
        text = "You are the shop's assistant. " + " ".join(words)
        if len(tokenizer.encode(text).ids) >= tokens:
            return text


def user_message(conversation: int, turn: int) -> str:
    rng = random.Random(conversation * 1000 + turn)
    return f"Customer {conversation}, question {turn}: " + " ".join(
        rng.choice(WORDS) for _ in range(12)
    )


def start_replica(model_dir: Path, workdir: Path, name: str, caching: bool):
    port = free_port()
    command = [
        sys.executable, "-m", "runtime", "serve", "--model", str(model_dir),
        "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(port),
        "--device", "cpu", "--cpu-threads", "1", "--max-num-seqs", "32",
    ]  # fmt: skip
    if not caching:
        command.append("--no-enable-prefix-caching")
    process = start(command, {"PYTHONUNBUFFERED": "1"}, workdir / f"{name}.log")
    return process, f"http://127.0.0.1:{port}"


def replica_counters(url: str) -> dict:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = {}
    for name in ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"):
        match = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.MULTILINE)
        found[name] = float(match.group(1)) if match else 0.0
    return found


def gateway_decisions(url: str) -> dict:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        decision: float(value)
        for decision, value in re.findall(
            r'^sirocco_gateway_prefix_routing_total\{decision="(\w+)",[^}]*\} (\S+)$',
            text,
            re.MULTILINE,
        )
    }


async def run_workload(base: str, key: str, args, system: str) -> dict:
    ttfts: list[float] = []
    completion_tokens = prompt_tokens = cached_tokens = 0
    failures: list[str] = []

    async def conversation(client: httpx.AsyncClient, index: int) -> None:
        nonlocal completion_tokens, prompt_tokens, cached_tokens
        messages = [{"role": "system", "content": system}]
        thinking = random.Random(index)  # the same pauses in every configuration
        for turn in range(args.turns):
            if args.think_time:
                await asyncio.sleep(thinking.expovariate(1 / args.think_time))
            messages.append({"role": "user", "content": user_message(index, turn)})
            body = {
                "model": MODEL,
                "messages": messages,
                "max_tokens": args.max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            sent = time.perf_counter()
            first = None
            parts: list[str] = []
            usage = None
            async with client.stream("POST", "/chat/completions", json=body) as response:
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {(await response.aread())[:200]!r}")
                    return
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk.get("choices") or ():
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            if first is None:
                                first = time.perf_counter() - sent
                            parts.append(text)
            if first is not None:
                ttfts.append(first)
            if usage:
                completion_tokens += usage["completion_tokens"]
                prompt_tokens += usage["prompt_tokens"]
                cached_tokens += (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            messages.append({"role": "assistant", "content": "".join(parts)})

    limits = httpx.Limits(max_connections=args.conversations + 4)
    async with httpx.AsyncClient(
        base_url=base, headers={"authorization": f"Bearer {key}"}, timeout=300, limits=limits
    ) as client:
        started = time.perf_counter()
        await asyncio.gather(*(conversation(client, i) for i in range(args.conversations)))
        elapsed = time.perf_counter() - started
    ttfts.sort()
    return {
        "requests": len(ttfts),
        "failures": failures[:5],
        "seconds": round(elapsed, 2),
        "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1) if ttfts else None,
        "ttft_p99_ms": round(1000 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], 1)
        if ttfts
        else None,
        "tokens_per_second": round(completion_tokens / elapsed, 1),
        "prompt_tokens": prompt_tokens,
        "cached_tokens": cached_tokens,
        "hit_rate": round(cached_tokens / prompt_tokens, 3) if prompt_tokens else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--conversations", type=int, default=32)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system-tokens", type=int, default=1500)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument(
        "--think-time",
        type=float,
        default=0.5,
        help="mean seconds a user pauses before each turn (exponential); 0: none (lockstep)",
    )
    parser.add_argument(
        "--hidden-size", type=int, default=TINY.hidden_size, help="the random MoE's width"
    )
    parser.add_argument("--intermediate-size", type=int, default=TINY.intermediate_size)
    parser.add_argument("--layers", type=int, default=TINY.num_layers)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-prefix-"))
    shape = MoeShape(args.hidden_size, args.intermediate_size, args.layers)
    model_dir = build_tiny_moe(workdir / "tiny-moe", shape=shape)
    from tokenizers import Tokenizer

    system = system_prompt(
        Tokenizer.from_file(str(model_dir / "tokenizer.json")), args.system_tokens
    )
    env = {
        "DATABASE_URL": f"sqlite:///{workdir / 'sirocco.sqlite3'}",
        "GATEWAY_ORG_RPM_LIMIT": str(HUGE_LIMIT),
        "GATEWAY_ORG_TPM_LIMIT": str(HUGE_LIMIT),
        "SECRET_KEY": "bench-" + uuid.uuid4().hex,
        "LOG_LEVEL": "WARNING",
        "DJANGO_SETTINGS_MODULE": "controlplane.settings.base",
        "SIROCCO_VAR_DIR": str(workdir / "var"),
    }
    for name in ("REDIS_URL", "CELERY_BROKER_URL"):
        os.environ.pop(name, None)
    manage = [sys.executable, "manage.py"]

    def shell(code: str) -> str:
        return subprocess.run(
            [*manage, "shell", "-c", code],
            cwd=REPO_ROOT,
            env={**os.environ, **env},
            check=True,
            capture_output=True,
            text=True,
        ).stdout

    log("migrating the gateway's SQLite database")
    subprocess.run(
        [*manage, "migrate", "-v0"], cwd=REPO_ROOT, env={**os.environ, **env}, check=True
    )
    key = shell(SEED.format(model=MODEL, served=SERVED, limit=HUGE_LIMIT)).split()[-1]

    report = {
        "replicas": args.replicas,
        "conversations": args.conversations,
        "turns": args.turns,
        "system_tokens": args.system_tokens,
        "model": {
            "hidden_size": shape.hidden_size,
            "intermediate_size": shape.intermediate_size,
            "layers": shape.num_layers,
        },
        "max_tokens": args.max_tokens,
        "think_time": args.think_time,
        "configurations": [],
    }
    for label, policy, caching in CONFIGURATIONS:
        log(f"{label}: starting {args.replicas} replicas and the gateway")
        replicas = [
            start_replica(model_dir, workdir, f"{policy}-{caching}-{i}", caching)
            for i in range(args.replicas)
        ]
        gateway = None
        try:
            for process, url in replicas:
                wait_http(f"{url}/health", timeout=180, process=process)
            endpoints = [url for _, url in replicas]
            shell(CONFIGURE.format(model=MODEL, policy=policy, endpoints=endpoints))
            port = free_port()
            serve = [
                sys.executable, "-m", "uvicorn", "gateway.asgi:application",
                "--host", "127.0.0.1", "--port", str(port), "--no-access-log",
                "--log-level", "warning",
            ]  # fmt: skip
            gateway = start(serve, env, workdir / f"gateway-{policy}-{caching}.log")
            wait_http(f"http://127.0.0.1:{port}/healthz", process=gateway)
            log(f"{label}: {args.conversations} conversations x {args.turns} turns")
            result = asyncio.run(run_workload(f"http://127.0.0.1:{port}/v1", key, args, system))
            counters = [replica_counters(url) for url in endpoints]
            hits = sum(c["vllm:prefix_cache_hits_total"] for c in counters)
            queries = sum(c["vllm:prefix_cache_queries_total"] for c in counters)
            result.update(
                configuration=label,
                routing_policy=policy,
                prefix_caching=caching,
                replica_hit_rate=round(hits / queries, 3) if queries else 0.0,
                routing_decisions=gateway_decisions(f"http://127.0.0.1:{port}"),
            )
            log(json.dumps(result))
            report["configurations"].append(result)
        finally:
            if gateway is not None:
                stop(gateway)
            for process, _ in replicas:
                stop(process)
    first, last = report["configurations"][0], report["configurations"][-1]
    report["ttft_p50_speedup"] = round(first["ttft_p50_ms"] / last["ttft_p50_ms"], 2)
    report["tokens_per_second_ratio"] = round(
        last["tokens_per_second"] / first["tokens_per_second"], 2
    )
    report["load_average"] = os.getloadavg()
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
