import sys

from cvmconf.cli import main

sys.exit(main())
