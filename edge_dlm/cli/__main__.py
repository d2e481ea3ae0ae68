"""`python -m edge_dlm.cli` is `edge-dlm`."""

import sys

from edge_dlm.cli import main

sys.exit(main())
