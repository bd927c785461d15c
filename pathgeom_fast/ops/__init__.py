"""The fused ops and their backends.

``wrappers`` holds the public ops (``secant_stats``, ``secant_stats_multi``, ``secant_gram``)
and chooses a backend; ``inputs`` checks and normalises their inputs; ``registration``
registers the ``torch.ops.pathgeom`` ops; ``extension`` loads the compiled kernels (``pathgeom_fast._C``);
``torch_backend`` is the pure-torch backend and fp64 reference; ``triton_plan``,
``triton_stats`` and ``triton_gram`` are the Triton backend; ``distributed`` adds the one
all-reduce for DTensor and ``group=`` inputs; ``compile_check`` inspects what the kernels
compile to, with ``kernel_resources`` (PTX, ptxas and cuobjdump readings, bytes in flight). ``pathgeom_fast.ops`` itself keeps the names the old ``ops`` module had.
"""

from .inputs import as_tensor_list
from .wrappers import BACKENDS, grads_of, numel_of, secant_gram, secant_stats, secant_stats_multi

__all__ = ["BACKENDS", "as_tensor_list", "grads_of", "numel_of", "secant_gram", "secant_stats", "secant_stats_multi"]
