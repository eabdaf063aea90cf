"""Triton kernels of lvopt's ops (backend="triton"), one module per op family
(lvopt/triton/<op>.py), each exporting functions with the signatures of torch.ops.lvopt.<op>."""
