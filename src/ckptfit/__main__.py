"""``python -m ckptfit``: the same command line as the ``ckptfit`` script."""
from ckptfit.cli import main

if __name__ == "__main__":
    main()
