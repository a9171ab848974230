"""`python -m chatsft.train` / `torchrun -m chatsft.train`: the FastChat-compatible entry point.

A thin alias of the `chatsft train` command (`chatsft.commands.train`), kept so that FastChat's launch lines
work unchanged.
"""

import sys

from chatsft.commands.train import cli

if __name__ == "__main__":
    sys.exit(cli())
