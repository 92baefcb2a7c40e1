import sys

from hfbridge.cli import main

sys.exit(main())
