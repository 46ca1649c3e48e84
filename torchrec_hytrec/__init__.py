"""torchrec-hytrec: HyTRec long-sequence encoders as a TorchRec extension."""

from torchrec_hytrec.version import __version__

__all__ = ["__version__"]
