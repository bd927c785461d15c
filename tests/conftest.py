import os

import torch

# Triton kernels run under the interpreter on machines without a GPU. This must be set
# before pathgeom_fast (and so its Triton kernels) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
