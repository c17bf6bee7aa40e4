"""``gircse serve``: load a model, serve it over HTTP until SIGINT / SIGTERM (in-flight requests finish)."""
from __future__ import annotations

import logging
import signal
import socket
import sys
import threading

from .common import _add_model_arguments, _load, int_at_least, number_in


def add_serve_parser(sub) -> None:
    from ..serve.protocol import Limits

    limits = Limits()
    parser = sub.add_parser("serve", help="OpenAI-compatible embeddings server (POST /v1/embeddings) with "
                                          "dynamic batching", description=__doc__)
    _add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=number_in(int, 0, 65535), default=8000,
                        help="0: any free port (printed when ready)")
    parser.add_argument("--served-model-name", default=None,
                        help="the id clients send as 'model' (default: --model as given; 'gircse-default' "
                             "for the default model)")
    parser.add_argument("--max-batch-size", type=int_at_least(1), default=32, help="texts per model call")
    parser.add_argument("--max-wait-ms", type=number_in(float, 0, 60_000), default=5.0,
                        help="how long the first queued text waits for others before a batch runs")
    parser.add_argument("--max-queue-texts", type=int_at_least(1), default=1024,
                        help="texts accepted and not yet embedded; beyond it requests get 503 + Retry-After")
    parser.add_argument("--max-inputs-per-request", type=int_at_least(1), default=limits.max_inputs_per_request)
    parser.add_argument("--max-input-chars", type=int_at_least(1), default=limits.max_input_chars,
                        help="characters per input text (and per instruction)")
    parser.add_argument("--max-body-bytes", type=int_at_least(1), default=limits.max_body_bytes)
    parser.add_argument("--query-instruction", default=None,
                        help="instruction for requests with input_type 'query' and no instruction "
                             "(default: none, the text alone)")
    parser.add_argument("--graceful-timeout", type=int_at_least(0), default=30,
                        help="seconds to let in-flight requests finish after SIGINT/SIGTERM; those still open "
                             "then get 503 shutting_down")
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
        raise ImportError(f"needs the optional server dependencies ({error.name} is missing): "
                          "pip install 'gircse[serve]'") from None
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    # Settings the parser cannot check alone (e.g. the queue must hold one full request): ValueError, one line.
    limits = Limits(max_inputs_per_request=args.max_inputs_per_request, max_input_chars=args.max_input_chars,
                    max_body_bytes=args.max_body_bytes)
    name = args.served_model_name or ("gircse-default" if args.model in (None, "default") else args.model)
    config = ServeConfig(model_name=name, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                         max_queue_texts=args.max_queue_texts, limits=limits, query_instruction=args.query_instruction)
    sock = _listen(args.host, args.port)  # bound before loading: a taken port fails fast
    host, port = sock.getsockname()[:2]
    model = _load(args)
    app = create_app(model, config)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, access_log=args.access_log,
                                           timeout_graceful_shutdown=args.graceful_timeout))
    print(f"gircse serve: listening on http://{host if ':' not in host else f'[{host}]'}:{port} "
          f"(model '{name}', POST /v1/embeddings)", file=sys.stderr, flush=True)
    # uvicorn handles SIGTERM (a graceful stop), then restores the previous handler and raises the signal
    # again; with this one in place that ends the process normally, status 0, instead of killed by SIGTERM.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stopped_by_sigterm) if in_main_thread else None
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled, after the graceful shutdown
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _stopped_by_sigterm(signum, frame) -> None:
    """The SIGTERM uvicorn raises again after its graceful shutdown: already handled, nothing left to do."""
