"""ablation: remove the refusal direction from open-weight LLMs, one tensor at a time."""

__version__ = "0.1.0"
