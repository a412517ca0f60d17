#!/usr/bin/env python3
"""N processes x K CPU devices on this machine; see t5lite/launch/local.py and docs/launching.md.

Usage: launch/local.py -n 2 [--devices_per_process 4] -- python -m t5lite.train --config ... --workdir ...
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from t5lite.launch import local  # noqa: E402

if __name__ == '__main__':
  sys.exit(local.main(sys.argv[1:]))
