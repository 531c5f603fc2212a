import sys

from mixdq.cli import main

sys.exit(main())
