"""Command line: `python -m runtime serve ...` and `python -m runtime make-tiny-moe --out DIR`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve a Mixtral-format model over the OpenAI API")
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
    serve.add_argument(
        "--cpu-threads",
        type=int,
        default=None,
        help="torch intra-op threads on CPU (default: torch's choice, one per core); small "
        "models and shared machines run faster with 1",
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

    tiny = commands.add_parser("make-tiny-moe", help="write the tiny Mixtral-format MoE checkpoint")
    tiny.add_argument("--out", type=Path, required=True, help="folder to write (created if needed)")
    tiny.add_argument("--seed", type=int, default=0)

    args = parser.parse_args(argv)
    if args.command == "make-tiny-moe":
        from runtime.tiny_moe import build_tiny_moe

        print(build_tiny_moe(args.out, seed=args.seed))
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
    if args.cpu_threads is not None:
        if args.cpu_threads < 1:
            parser.error("--cpu-threads must be at least 1")
        import torch

        torch.set_num_threads(args.cpu_threads)
    args.download_dir = args.download_dir or DEFAULT_CACHE_DIR
    return run_server(args)


if __name__ == "__main__":
    sys.exit(main())
