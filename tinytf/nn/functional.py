"""The op namespace users import, as in PyTorch: `import tinytf.nn.functional as F`.

Every differentiable op of tinytf.functional, and scaled_dot_product_attention and varlen_attention from
tinytf.attention: this layer may see both, while the ops below it never see attention.
"""

from ..attention import cu_seqlens_from_positions, scaled_dot_product_attention, varlen_attention
from ..functional import *  # noqa: F403 (the op layer's __all__ is this namespace)
from ..functional import __all__ as _ops

__all__ = [*_ops, "scaled_dot_product_attention", "varlen_attention", "cu_seqlens_from_positions"]
