"""gptjax: train and scale GPT models in JAX/Flax."""

__version__ = "0.1.0"
