"""``python -m dect_maas_server`` runs the same command as ``dect-maas-server``."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
