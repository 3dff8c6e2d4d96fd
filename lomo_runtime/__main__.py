"""`python -m lomo_runtime ...`: the same as the `lomo-run` command (for launchers that run modules)."""
from .cli import main

if __name__ == "__main__":
    main()
