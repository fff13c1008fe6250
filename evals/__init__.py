"""SAE evaluation: reconstruction quality and latent statistics."""

from saelab.evals.reconstruction import reconstruction_stats

__all__ = ["reconstruction_stats"]
