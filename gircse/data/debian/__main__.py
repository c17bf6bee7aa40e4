import sys

from gircse.cli.debian import main

sys.exit(main())
