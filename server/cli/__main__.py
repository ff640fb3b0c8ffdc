"""`python -m server.cli …` runs the `customllm` command."""
import sys

from server.cli.main import main

sys.exit(main())
