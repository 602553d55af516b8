#!/usr/bin/env python3
"""Rank layers by refusal-signal quality: `ablation analyze` under its script name."""

import sys

from ablation.cli import main

if __name__ == "__main__":
    sys.exit(main(["analyze", *sys.argv[1:]]))
