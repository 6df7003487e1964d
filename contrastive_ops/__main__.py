"""``python -m contrastive_ops``: environment, self-check and timing table."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
