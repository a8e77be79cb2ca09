"""Command line: ``python -m ema_kit demo`` trains the demo (see ``ema_kit.examples.demo``)."""

import sys

from .examples import demo

COMMANDS = {"demo": demo.main}


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in COMMANDS:
        sys.exit(
            f"usage: python -m ema_kit {{{','.join(COMMANDS)}}} [options]"
            "   (try: python -m ema_kit demo --help)"
        )
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
