#!/usr/bin/env python3
"""Kubernetes tooling for the GNP trainer: `python k8s/render.py --help` (the make targets run it).

The code is the package gnpk8s (k8s/gnpk8s/, installed with the project: `pip install -e .`, or
`pip install --no-deps -e .` in the light client .venv-k8s). Run as a script, this file's folder is first on
sys.path, so the checkout's gnpk8s is the one imported.
"""

from __future__ import annotations

import sys

from gnpk8s.cli import main

if __name__ == "__main__":
    sys.exit(main())
