"""jaxalign: supervised fine-tuning then DPO for open-weight LLMs in JAX/Flax."""

from jaxalign.errors import JaxalignError

__all__ = ["JaxalignError"]
__version__ = "0.1.0"
