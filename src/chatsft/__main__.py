"""`python -m chatsft <command>`: the same as the `chatsft` console script."""

import sys

from chatsft.commands.cli import main

sys.exit(main())
