"""``python -m broker`` is the ``broker`` command."""

import sys

from broker.cli.main import main

sys.exit(main())
