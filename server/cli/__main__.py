"""`python -m server.cli …` runs the `customllm` command."""
import sys

from server.cli.main import main

if __name__ == "__main__":      # not when the engine-core process (spawned) imports this module
    sys.exit(main())
