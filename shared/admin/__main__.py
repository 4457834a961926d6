"""`python -m shared.admin ...`: the admin command."""

from shared.admin.cli import main

raise SystemExit(main())
