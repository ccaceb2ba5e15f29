import sys

from inkwash.commands.cli import main

sys.exit(main())
