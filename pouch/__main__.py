import sys

from pouch.cli import pouchd_main

sys.exit(pouchd_main())
