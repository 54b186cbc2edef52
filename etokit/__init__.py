"""etokit: Exploration-based Trajectory Optimization (Song et al., ACL 2024) on the Hugging Face stack."""

__version__ = "0.1.0"
