"""The client side: everything that does I/O or keeps state across runs.

``client.py`` sends requests (reserve and record as sent, rate limit, send with retries, parse,
store, settle); ``cache.py`` and ``ledger.py`` are the two stores; ``budget.py``, ``retry.py``,
``ratelimit.py`` and ``settings.py`` are the policies it applies. Adapters (``dect_maas.adapters``)
say what to send and how to read the answer; they never do I/O themselves.

Internal: import the public names from ``dect_maas``.
"""
