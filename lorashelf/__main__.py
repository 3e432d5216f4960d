import sys

from lorashelf.cli import main

sys.exit(main())
