"""Shared plumbing: user-facing errors, device choice, seeding, checkpoints, grids and metric logs."""
import json
import os
import random
import sys

import numpy as np
import torch


class UserError(Exception):
    """A problem with the user's input: reported as one line on stderr, never as a traceback."""


def run_cli(main):
    """Run `main()`, turning a UserError into one line on stderr and exit status 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
