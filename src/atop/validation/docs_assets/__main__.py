"""``python -m atop.validation.docs_assets install|check`` (see :func:`main`)."""

from atop.validation.docs_assets import main

raise SystemExit(main())
