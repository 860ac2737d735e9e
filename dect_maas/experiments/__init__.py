"""Experiments: from a config file to a report, and the commands built on them.

``config_file.py`` validates the TOML; ``wiring.py`` turns it into an adapter, a client and
estimators; ``data.py`` loads and samples examples; ``runner.py`` queries once and fits every
method; ``icl.py`` and ``bbt.py`` are the input-side methods compared against DecT;
``report.py`` and ``cost_report.py`` write what a user reads; ``demo.py`` and ``predict.py`` are
the CLI's bigger commands.

Internal: import the public names from ``dect_maas``.
"""
