import sys

from pymesh.cli.main import main

sys.exit(main())
