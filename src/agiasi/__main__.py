"""`python -m agiasi …` (and `torchrun -m agiasi train …`)."""

from agiasi.cli import console

if __name__ == "__main__":
    raise SystemExit(console())
