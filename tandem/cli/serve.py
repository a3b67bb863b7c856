"""`tandem serve`: the model behind OpenAI's and Ollama's HTTP APIs (docs/server.md)."""

from __future__ import annotations

import argparse
import os
import socket
import sys

from tandem.cli.common import add_model_arguments, positive_int, resolve_model_path
from tandem.errors import TandemError

HELP = "serve a model over OpenAI's and Ollama's HTTP APIs (/v1/..., /api/...)"
KEY_ENV = "TANDEM_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    group = parser.add_argument_group("server")
    group.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)"
    )
    group.add_argument("--port", type=int, default=10002, help="port (default: 10002)")
    group.add_argument(
        "--api-key",
        metavar="KEY",
        help=f"require `Authorization: Bearer KEY` (default: ${KEY_ENV}, else none)",
    )
    group.add_argument("--ctx", type=positive_int, metavar="N", help="context length (default: the model's)")
    group.add_argument(
        "--max-queue",
        type=positive_int,
        default=16,
        metavar="Q",
        help="requests that may wait for the model; more get 503 (default: 16)",
    )


def run(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise TandemError(f"--port must be in 1 ... 65535, got {args.port}")
    import uvicorn

    from tandem.cli.common import load_from_args
    from tandem.server.app import Server, create_app, model_names
    from tandem.server.host import ModelHost

    path = resolve_model_path(args.model)  # fails now, before the port opens, if the file is missing
    args.model = str(path)
    api_key = args.api_key or os.environ.get(KEY_ENV) or None
    sock = _bind(args.host, args.port)  # a taken port is an error before anything loads
    model_id, aliases = model_names(path)
    host = ModelHost(lambda: load_from_args(args), max_queue=args.max_queue)
    app = create_app(Server(host, model_id, aliases, args.ctx, api_key, str(path)))
    host.start()  # loads in the background: /health answers 503 until the model is ready
    where = f"http://{args.host}:{args.port}"
    print(
        f"tandem serve: {model_id} at {where}/v1 (loading; {where}/health says when ready)", file=sys.stderr
    )
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise TandemError(f"cannot serve on {host}:{port}: {error.strerror or error}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as error:
        sock.close()
        raise TandemError(f"cannot serve on {host}:{port}: {error.strerror or error}") from None
    return sock
