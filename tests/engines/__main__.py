"""`python -m tests.engines NAME`: the DOCKER_HOST of a test engine (for the benchmark's --remote)."""

from __future__ import annotations

import json
import os
import sys

if __name__ == "__main__":
    with open(os.environ["CELLBOX_TEST_ENGINES"]) as file:
        print(json.load(file)[sys.argv[1]]["env"]["DOCKER_HOST"])
