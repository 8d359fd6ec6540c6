"""``python -m torchaux`` runs the command line."""

import sys

from torchaux.cli.main import main

sys.exit(main())
