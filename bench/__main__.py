"""``python -m bench``: the same as ``settle bench`` (see :mod:`bench.run`)."""

from bench.run import main

raise SystemExit(main())
