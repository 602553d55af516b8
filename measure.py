#!/usr/bin/env python3
"""Measure refusal directions: `ablation measure` under its script name."""

import sys

from ablation.cli import main

if __name__ == "__main__":
    sys.exit(main(["measure", *sys.argv[1:]]))
