"""``python -m dect_maas`` is the ``dect-maas`` command."""

from .cli import main

raise SystemExit(main())
