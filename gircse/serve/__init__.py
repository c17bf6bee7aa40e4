"""``gircse serve``: an OpenAI-compatible embeddings server with dynamic batching.

- :mod:`gircse.serve.protocol`: the wire format (request validation, OpenAI error shape, responses);
  plain Python + numpy.
- :mod:`gircse.serve.batcher`: :class:`~gircse.serve.batcher.DynamicBatcher`, which gathers the texts
  of concurrent requests into batches for the one thread that runs the model.
- :mod:`gircse.serve.app`: ``create_app(model, config)``, the FastAPI application.
- :mod:`gircse.cli.serve`: the ``gircse serve`` subcommand.

FastAPI and uvicorn are optional dependencies (``pip install 'gircse[serve]'``); nothing here imports
them until a server is built, so ``gircse --help`` works without them.
"""
