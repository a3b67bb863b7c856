"""tandem: Mixture-of-Experts language models larger than GPU memory on one workstation."""

__version__ = "0.1.0"
