"""Test-run-wide set-up that must happen before any test module is imported."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Hypothesis caches what it reads from source files in ./.hypothesis even without an example
# database, and does so while pytest collects (before any fixture runs): give it a directory of this
# run's own, removed when the test process ends, so no test leaves a directory in the work tree or /tmp.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    from hypothesis.configuration import set_hypothesis_home_dir

    _HOME = Path(tempfile.mkdtemp(prefix="mobykit-hypothesis-"))
    atexit.register(shutil.rmtree, _HOME, True)
    set_hypothesis_home_dir(_HOME)
