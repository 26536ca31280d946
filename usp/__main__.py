import sys

from usp.cli import main

sys.exit(main())
