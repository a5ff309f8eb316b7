"""Rewrites applied while lowering, one per module: a source rewrite of Inductor's Triton kernels
(:mod:`indirect_grad_loads`), and post-grad graph passes that :mod:`optcapture.lowering` composes into Inductor's
``post_grad_custom_post_pass`` (:mod:`scalars_once`, :mod:`state_writes_early`, :mod:`matmul_operands`)."""
