"""The server's routes, one module per API family.

Each module exposes ``register(app, state)``: it adds its routes to the FastAPI ``app`` (or, for
a hot path that bypasses FastAPI, to ``state.raw_routes``) and reaches the model only through
``state`` (``AppState``: engine, batcher, limits and the helpers that map their failures to
HTTP errors). ``app.create_app`` calls them in the order of ``ROUTES``; a new route family is a
new module here plus one entry in that tuple.
"""
