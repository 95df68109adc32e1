"""`python -m napari_pathflip.commands ...` (what torchrun starts) is the `pathflip` command."""

import sys

from . import main

sys.exit(main())
