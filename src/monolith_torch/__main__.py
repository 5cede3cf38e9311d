"""``python -m monolith_torch`` runs the ``monolith-torch`` command."""

import sys

from monolith_torch.cli import main

sys.exit(main())
