"""Serving a library: generation with any composition, batched, over HTTP.

:mod:`~lorashelf.serve.compositions` names what a request asks for (the base, one
expert, weights, a merge, a router), :mod:`~lorashelf.serve.bank` attaches every
expert of the served libraries once and resolves compositions into per-row plans
(:mod:`~lorashelf.serve.plan`), :mod:`~lorashelf.serve.engine` batches requests and
decodes them with one KV cache, and :mod:`~lorashelf.serve.app` is the
OpenAI-compatible HTTP server (``lorashelf serve``). Importing this package imports
neither torch nor FastAPI.
"""
