"""`python -m agiasi …` (and `torchrun -m agiasi train …`)."""

from agiasi.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
