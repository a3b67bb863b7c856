"""The tiny-model builder lives in the package (tandem.synth.tiny); tests import it from here."""

from tandem.synth.tiny import GGUF_ARCH, MOE_ARCHS, tiny_config, tiny_model, write_gguf

__all__ = ["GGUF_ARCH", "MOE_ARCHS", "tiny_config", "tiny_model", "write_gguf"]
