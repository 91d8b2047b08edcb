import sys

from defang.cli import main

sys.exit(main())
