"""The design note's command line, kept working as a thin shim over `agiasi train`.

    python scripts/training/inject_soul_into_borea.py --base-model … --max-steps 500 …

Every flag of `agiasi train` is accepted; the note's own flags keep their names and defaults.
"""

import sys

from agiasi.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))
