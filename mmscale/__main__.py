"""`python -m mmscale` is the `mmscale` command."""

from mmscale.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
