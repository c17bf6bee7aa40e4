import sys

from gircse.data.wordnet import main

sys.exit(main())
