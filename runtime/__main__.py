"""Command line of the runtime image.

python -m runtime serve --model PATH_OR_S3_URI ...     the OpenAI-compatible server
python -m runtime download --model S3_URI --out DIR    fetch and verify a model folder
python -m runtime make-tiny-moe --out DIR              write the tiny MoE checkpoint
python -m runtime make-tiny-embedding --out DIR        write the tiny embedding checkpoint
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m runtime",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="serve a Mixtral-format model (or a BERT-format embedding model) over the OpenAI API",
    )
    serve.add_argument("--model", required=True, help="model folder, or s3://bucket/prefix")
    serve.add_argument("--served-model-name", help="name clients pass as `model` (default: folder)")
    serve.add_argument("--host", default="0.0.0.0")  # noqa: S104 (the pod's port is the API)
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port (it is logged)")
    serve.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    serve.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: float32 on CPU, bfloat16 on CUDA",
    )
    serve.add_argument("--max-model-len", type=int, default=None, help="context length in tokens")
    serve.add_argument("--max-num-seqs", type=int, default=32, help="sequences decoded together")
    # vLLM's names for the same knobs (https://docs.vllm.ai/en/stable/cli/serve.html).
    serve.add_argument(
        "--block-size", type=int, default=16, help="tokens per KV-cache block (default 16)"
    )
    serve.add_argument(
        "--num-gpu-blocks-override",
        type=int,
        default=None,
        help="KV-cache blocks, on CPU too (default: max-num-seqs full-length sequences' worth)",
    )
    serve.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV cache of prompt prefixes seen before (default: on)",
    )
    serve.add_argument(
        "--cpu-threads",
        type=int,
        default=None,
        help="torch intra-op threads on CPU (default: the CPUs this container may use, by its "
        "cgroup CPU limit); small models and shared machines run faster with 1",
    )
    serve.add_argument(
        "--download-dir",
        type=Path,
        default=None,
        help="cache for s3:// models (default: $SIROCCO_RUNTIME_CACHE or ~/.cache/sirocco-runtime)",
    )
    serve.add_argument(
        "--enforce-eager", action="store_true", help="on CUDA, run decode without CUDA graphs"
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--access-log", action="store_true", help="log every HTTP request")
    serve.add_argument(
        "--standby",
        type=float,
        default=None,
        metavar="SECONDS",
        help="a warm standby: wait for a line on stdin before serving (end of input: exit 0), "
        "and after SECONDS import the server's modules (torch) meanwhile, so that serving then "
        "costs only the model's load (the local provisioner restarts a crashed replica so)",
    )

    download = commands.add_parser(
        "download", help="copy a model folder from s3:// and verify it against its manifest"
    )
    download.add_argument("--model", required=True, help="s3://bucket/prefix")
    download.add_argument("--out", type=Path, required=True, help="folder to write")

    tiny = commands.add_parser("make-tiny-moe", help="write the tiny Mixtral-format MoE checkpoint")
    tiny.add_argument("--out", type=Path, required=True, help="folder to write (created if needed)")
    tiny.add_argument("--seed", type=int, default=0)
    tiny_embedding = commands.add_parser(
        "make-tiny-embedding", help="write the tiny BERT-format embedding checkpoint"
    )
    tiny_embedding.add_argument("--out", type=Path, required=True, help="folder to write")
    tiny_embedding.add_argument("--seed", type=int, default=0)

    args = parser.parse_args(argv)
    if args.command == "make-tiny-moe":
        from runtime.tiny_moe import build_tiny_moe

        print(build_tiny_moe(args.out, seed=args.seed))
        return 0
    if args.command == "make-tiny-embedding":
        from runtime.tiny_embedding import build_tiny_embedding

        print(build_tiny_embedding(args.out, seed=args.seed))
        return 0

    if args.command == "download":
        import logging

        from runtime.loader import ModelLoadError, download_from_s3, verify_manifest

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        if not args.model.startswith("s3://"):
            parser.error("--model must be an s3:// URI")
        try:
            verify_manifest(download_from_s3(args.model, args.out, nested=False))
        except ModelLoadError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        return 0

    if args.standby is not None and not _wait_as_standby(args.standby, lambda: _warm_cpu(args)):
        return 0
    from runtime.loader import DEFAULT_CACHE_DIR
    from runtime.server import serve as run_server

    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.max_num_seqs < 1:
        parser.error("--max-num-seqs must be at least 1")
    if args.block_size < 1:
        parser.error("--block-size must be at least 1")
    if args.num_gpu_blocks_override is not None and args.num_gpu_blocks_override < 2:
        parser.error("--num-gpu-blocks-override must be at least 2")
    if args.cpu_threads is not None and args.cpu_threads < 1:
        parser.error("--cpu-threads must be at least 1")
    if args.device == "cpu":
        import torch

        torch.set_num_threads(args.cpu_threads or _available_cpus())
    args.download_dir = args.download_dir or DEFAULT_CACHE_DIR
    return run_server(args)


def _wait_as_standby(import_after: float, warm) -> bool:
    """Block until a line comes on stdin (True: serve now) or it ends (False: not needed any
    more; the process that holds the other end exited or let go). The imports (and `warm()`)
    wait `import_after` seconds first, so that they do not compete for the CPU with the replica
    this one stands by for while it loads."""
    told = threading.Event()
    heard: list[tuple[str, float]] = []

    def listen() -> None:
        line = sys.stdin.readline()
        heard.append((line, time.time()))
        told.set()

    threading.Thread(target=listen, name="standby", daemon=True).start()
    if not told.wait(import_after):
        import runtime.server  # noqa: F401  (torch, starlette, uvicorn, the engine)

        warm()
        print("standby: imported, waiting", file=sys.stderr, flush=True)
    told.wait()
    [(line, at)] = heard
    if not line:
        return False
    # When it was told (its imports may have gone on a little after), for whoever checks the
    # GPU time billed from then.
    print(f"standby: serving now (pid {os.getpid()}, at {at:.3f})", file=sys.stderr, flush=True)
    return True


def _warm_cpu(args) -> None:
    """On CPU, start torch's thread pool and its matrix kernels, which the model's first steps
    would otherwise pay for (over a second of a standby's load on a busy machine). Nothing is
    done for CUDA: a standby holds no GPU memory."""
    import torch

    if args.device not in (None, "cpu") or (args.device is None and torch.cuda.is_available()):
        return
    torch.set_num_threads(args.cpu_threads or _available_cpus())
    sample = torch.randn(64, 64)
    torch.softmax(torch.nn.functional.silu(sample @ sample), dim=-1)


def _available_cpus() -> int:
    """CPUs this process may use: the cgroup v2 CPU limit if any, else its CPU affinity.

    torch would start one thread per core of the node, and in a pod limited to 2 CPUs on a
    64-core node those threads would mostly wait on the CFS throttle.
    """
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


if __name__ == "__main__":
    sys.exit(main())
