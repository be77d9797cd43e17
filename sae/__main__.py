"""`python -m sae ...` (and `torchrun ... -m sae ...`) runs the CLI."""

from sae.cli import main

if __name__ == "__main__":
    main()
