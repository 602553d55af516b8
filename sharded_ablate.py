#!/usr/bin/env python3
"""Rewrite a sharded checkpoint from YAML marching orders: `ablation ablate` under its old name."""

import sys

from ablation.cli import main

if __name__ == "__main__":
    sys.exit(main(["ablate", *sys.argv[1:]]))
