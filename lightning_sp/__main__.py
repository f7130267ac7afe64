import sys

from lightning_sp.cli import main

sys.exit(main())
