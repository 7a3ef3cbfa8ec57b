"""Triton kernels for Allegro (installed as allegro_fast.kernels), used by `Allegro(cfg, backend="triton")`.

- `edge_geometry`: lengths, Bessel basis, envelope and spherical harmonics of the edge vectors in one kernel,
  its backward and its double backward (second derivatives written out);
- `tensor_product`: the environment sum and the channel-wise tensor product as slots of two trilinear forms,
  with the fused per-center layer forward `fused_layer` (environment, product and channel mixing in one
  kernel), its one-kernel backward `fused_layer_backward`, whose derivative (force training's double backward)
  is one op, `fused_layer_double_backward`, that runs the two layer kernels once per direction, and the slot
  kernels;
- `segments`: sums over the edges of each atom and the atoms of each structure in a fixed order (no atomics),
  for energies and for the gradients to positions, cells and strains;
- `precompile`: compile every kernel a model launches, in parallel processes, before its first call.

Every op is a `torch.library.custom_op` (allegro_fast::edge_geometry, ::edge_geometry_backward,
::edge_geometry_double_backward, ::fused_layer, ::fused_layer_backward, ::fused_layer_double_backward,
::trilinear_slot, ::segment_sum, ::segment_expand). Kernels need CUDA tensors, or CPU tensors with
TRITON_INTERPRET=1 set before triton is imported; importing this package does not import triton.
"""
