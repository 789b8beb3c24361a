"""`python -m dataworth` (also what `torchrun -m dataworth` and `accelerate launch -m dataworth` run)."""

from dataworth.cli import main

if __name__ == "__main__":
    main()
