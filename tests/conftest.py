"""Test-wide setup: Minari datasets go to a private temporary folder."""

import os
import tempfile

# Set before any test imports minari, so no test reads or writes ~/.minari.
os.environ["MINARI_DATASETS_PATH"] = tempfile.mkdtemp(prefix="o2o-minari-")
