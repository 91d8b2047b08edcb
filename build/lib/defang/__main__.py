import sys

from defang.cli.main import main

sys.exit(main())
