"""``python -m ptl_timm``: the ptl-timm command line (see ptl_timm.cli)."""
import sys

from .cli import main

sys.exit(main())
