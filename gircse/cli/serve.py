"""``gircse serve``: load a model, serve it over HTTP until SIGINT / SIGTERM (in-flight requests finish)."""
from __future__ import annotations

import logging
import socket
import sys

from .common import _add_model_arguments, _load


def add_serve_parser(sub) -> None:
    from ..serve.protocol import Limits

    limits = Limits()
    parser = sub.add_parser("serve", help="OpenAI-compatible embeddings server (POST /v1/embeddings) with "
                                          "dynamic batching", description=__doc__)
    _add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port (printed when ready)")
    parser.add_argument("--served-model-name", default=None,
                        help="the id clients send as 'model' (default: --model as given; 'gircse-default' "
                             "for the default model)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="texts per model call")
    parser.add_argument("--max-wait-ms", type=float, default=5.0,
                        help="how long the first queued text waits for others before a batch runs")
    parser.add_argument("--max-queue-texts", type=int, default=1024,
                        help="texts accepted and not yet embedded; beyond it requests get 503 + Retry-After")
    parser.add_argument("--max-inputs-per-request", type=int, default=limits.max_inputs_per_request)
    parser.add_argument("--max-input-chars", type=int, default=limits.max_input_chars,
                        help="characters per input text (and per instruction)")
    parser.add_argument("--max-body-bytes", type=int, default=limits.max_body_bytes)
    parser.add_argument("--query-instruction", default=None,
                        help="instruction for requests with input_type 'query' and no instruction "
                             "(default: none, the text alone)")
    parser.add_argument("--graceful-timeout", type=int, default=30,
                        help="seconds to let in-flight requests finish after SIGINT/SIGTERM")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                        help="'debug' logs every batch (size, requests, time)")
    parser.add_argument("--access-log", action="store_true", help="log every HTTP request")
    parser.set_defaults(func=run_serve)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=2048)


def run_serve(args) -> int:
    try:
        import uvicorn

        from ..serve.app import ServeConfig, create_app
        from ..serve.protocol import Limits
    except ImportError as error:
        raise SystemExit(f"gircse serve needs the optional server dependencies ({error.name} is missing): "
                         "pip install 'gircse[serve]'") from None
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        limits = Limits(max_inputs_per_request=args.max_inputs_per_request, max_input_chars=args.max_input_chars,
                        max_body_bytes=args.max_body_bytes)
        name = args.served_model_name or ("gircse-default" if args.model in (None, "default") else args.model)
        config = ServeConfig(model_name=name, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                             max_queue_texts=args.max_queue_texts, limits=limits,
                             query_instruction=args.query_instruction)
        if not 0 <= args.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {args.port}")
    except ValueError as error:
        raise SystemExit(f"gircse serve: {error}") from None
    sock = _listen(args.host, args.port)  # bound before loading: a taken port fails fast
    host, port = sock.getsockname()[:2]
    model = _load(args)
    app = create_app(model, config)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, access_log=args.access_log,
                                           timeout_graceful_shutdown=args.graceful_timeout))
    print(f"gircse serve: listening on http://{host if ':' not in host else f'[{host}]'}:{port} "
          f"(model '{name}', POST /v1/embeddings)", file=sys.stderr, flush=True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled, after the graceful shutdown
        return 130
    return 0
