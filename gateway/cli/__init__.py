"""One command line for operators: ``vmgate serve | migrate | create-admin | jobspec ...``
(also ``python -m gateway.cli``). The top layer: it may use every other one."""

from gateway.cli.main import main

__all__ = ["main"]
