"""lowbit's GPU kernels, written in Triton (imported only where a GPU kernel is built or tested, so
that importing lowbit does not import triton).  Without a GPU they run on CPU tensors under
``TRITON_INTERPRET=1``, which is how the tests check them."""
