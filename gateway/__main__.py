"""`python -m gateway`: run the gateway (the same as `vmgate serve`), settings from the environment and `.env`."""

from __future__ import annotations

import sys

from gateway.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve"]))
