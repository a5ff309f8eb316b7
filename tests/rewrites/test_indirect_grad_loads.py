"""The grad-table rewrite on kernel and wrapper source text shaped like Inductor's (torch 2.11 output)."""

from __future__ import annotations

import torch

from optcapture.rewrites.indirect_grad_loads import MARKER, IndirectGrad, IndirectGradLoads

KERNEL = '''
@triton.jit
def triton_poi_fused_lerp_0(in_ptr0, in_ptr1, out_ptr0, xnumel, XBLOCK : tl.constexpr):
    xnumel = 1320
    xoffset = tl.program_id(0) * XBLOCK
    xindex = xoffset + tl.arange(0, XBLOCK)[:]
    xmask = xindex < xnumel
    x0 = xindex
    tmp0 = tl.load(in_ptr0 + (x0), xmask)
    tmp1 = tl.load(in_ptr1 + (x0), xmask, eviction_policy='evict_first')
    tmp2 = tmp0 + tmp1
    tl.store(out_ptr0 + (x0), tmp2, xmask)
'''

GRAD = IndirectGrad(pointer=0x1000, dtype=torch.float32, chunk=64, addresses_at=3, limits_at=5)


NAMES = {0x2000: "arg0_1", 0x1000: "arg1_1", 0x3000: "arg2_1"}


def _inputs(pointer: int) -> str | None:
    return {0x2000: "in_ptr0", 0x1000: "in_ptr1"}.get(pointer)


def test_a_grad_load_becomes_a_load_through_the_table() -> None:
    loads = IndirectGradLoads([GRAD])
    source = loads(_inputs, KERNEL)
    assert "tl.load(in_ptr1 + (x0)" not in source
    assert f"tmp1{MARKER}_member = tl.load(in_ptr1.to(tl.pointer_type(tl.int32)) + (x0) // 64, xmask, other=0)" \
        in source
    assert f"tmp1{MARKER}_base = tl.load(in_ptr1.to(tl.pointer_type(tl.int64)) + 3 + tmp1{MARKER}_member" in source
    assert f"tmp1{MARKER}_limit = tl.load(in_ptr1.to(tl.pointer_type(tl.int64)) + 5 + tmp1{MARKER}_member" in source
    assert (f"tmp1 = tl.load(tmp1{MARKER}_base.to(tl.pointer_type(tl.float32)) + (x0), "
            f"xmask & ((x0) < tmp1{MARKER}_limit), other=0.0)") in source
    assert "tmp0 = tl.load(in_ptr0 + (x0), xmask)" in source  # other inputs untouched
    assert loads.rewritten_loads == 1 and loads.failures == []


def test_a_kernel_without_the_grad_is_left_alone() -> None:
    loads = IndirectGradLoads([GRAD])
    assert loads(lambda pointer: "in_ptr0" if pointer == 0x2000 else None, KERNEL) == KERNEL
    assert loads.rewritten_loads == 0


def test_an_unknown_use_of_the_grad_is_a_failure() -> None:
    loads = IndirectGradLoads([GRAD])
    loads(_inputs, KERNEL.replace("tl.store(out_ptr0 + (x0), tmp2, xmask)", "tl.store(in_ptr1 + (x0), tmp2, xmask)"))
    assert loads.failures and "in_ptr1" in loads.failures[0]
    assert loads.verify([], NAMES) is not None


def _wrapper(kernel_source: str, extra: str = "") -> str:
    return f"""
triton_poi_fused_lerp_0 = async_compile.triton('triton_poi_fused_lerp_0', '''{kernel_source}''', device_str='cuda')

def call(args):
    # Topologically Sorted Source Nodes: [lerp_], Original ATen: [aten.lerp]
    #   %arg1_1 : Tensor "f32[1320][1]cuda:0" = PlaceHolder[target=arg1_1]
    arg0_1, arg1_1, arg2_1 = args
    args.clear()
    assert_size_stride(arg1_1, (1320, ), (1, ))
    triton_poi_fused_lerp_0.run(arg0_1, arg1_1, arg2_1, 1320, stream=stream0)
{extra}    del arg1_1


def get_args():
    arg1_1 = rand_strided((1320, ), (1, ), device='cuda:0', dtype=torch.float32)
    return [arg1_1]
"""


def test_verify_accepts_a_wrapper_that_only_passes_the_grad_to_rewritten_kernels() -> None:
    loads = IndirectGradLoads([GRAD])
    rewritten = loads(_inputs, KERNEL)
    assert loads.verify([_wrapper(rewritten)], NAMES) is None


def test_verify_refuses_a_grad_read_outside_the_rewritten_kernels() -> None:
    loads = IndirectGradLoads([GRAD])
    rewritten = loads(_inputs, KERNEL)
    wrapper = _wrapper(rewritten, extra="    buf0 = torch.ops.aten.clone(arg1_1)\n")
    problem = loads.verify([wrapper], NAMES)
    assert problem is not None and "arg1_1" in problem


def test_verify_refuses_an_unrewritten_kernel_and_a_missing_wrapper() -> None:
    loads = IndirectGradLoads([GRAD])
    loads(_inputs, KERNEL)
    assert "not found" in (loads.verify([], NAMES) or "")
    assert loads.verify([_wrapper(KERNEL)], NAMES) is not None


def test_a_half_precision_grad_load_keeps_its_upcast() -> None:
    loads = IndirectGradLoads([IndirectGrad(0x1000, torch.bfloat16, 64, 3, 5)])
    source = loads(_inputs, KERNEL.replace("xmask, eviction_policy='evict_first')",
                                           "xmask, eviction_policy='evict_first').to(tl.float32)"))
    assert (f"tmp1 = tl.load(tmp1{MARKER}_base.to(tl.pointer_type(tl.bfloat16)) + (x0), "
            f"xmask & ((x0) < tmp1{MARKER}_limit), other=0.0).to(tl.float32)") in source
    assert loads.failures == []
