"""``python -m txfm ...`` = ``txfm ...``."""
import sys

from txfm.cli import main

sys.exit(main())
