"""pathgeom_fast: fused kernels for the geometry of optimization paths."""
