import sys

from mirrorfs.cli import main

sys.exit(main())
