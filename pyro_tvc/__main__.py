"""``python -m pyro_tvc`` is ``pyro-tvc``."""
import sys

from pyro_tvc.cli import main

sys.exit(main())
