"""
``python -m twisted_rekey``: the ``twisted-rekey`` command, which lives in
:mod:`twisted_rekey.apps.cli`.
"""

from __future__ import annotations

import sys

from twisted_rekey.apps.cli import main

if __name__ == "__main__":
    sys.exit(main())
