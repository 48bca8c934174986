"""``python -m segcft``: the same command line as the ``segcft`` script."""

from segcft.cli import main

if __name__ == "__main__":
    main()
