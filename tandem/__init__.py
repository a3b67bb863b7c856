"""tandem: Mixture-of-Experts language models larger than GPU memory on one workstation."""

import os

# torch's OpenMP workers spin after every parallel op by default, on the cores the
# C++ engine's pool is about to use (prefill of the embedded model on two cores:
# 56 tok/s spinning, 89 passive). Passive workers sleep instead. It takes effect
# only if set before torch loads OpenMP (importing tandem first does that); a value
# the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
