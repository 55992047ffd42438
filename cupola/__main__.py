"""``python -m cupola`` (e.g. ``torchrun --nproc-per-node 2 -m cupola eval niah ... --sp 2``)."""

import sys

from cupola.toolkit.cli import main

sys.exit(main())
