import os

import torch

# Sizes for `pytest bench/`: PATHGEOM_BENCH_SIZE elements in the large list (default 10^8).
SIZE = int(os.environ.get("PATHGEOM_BENCH_SIZE", 10**8))
DEVICE = os.environ.get("PATHGEOM_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
