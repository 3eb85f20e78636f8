"""parti_jax.roofline on programs compiled here, whose bytes and FLOPs are known by hand:
loop bodies count once per iteration, a scanned layer reads its own slice of the stacked
weights, a donated buffer updated in place costs the update, cuDNN's attention its products,
a library's workspace and an async collective's operands nothing extra. (tests/test_gpu_plan.py:
the planner's roofline of a GPU-compiled Parti step.)"""

import jax
import jax.numpy as jnp
import pytest

from parti_jax import roofline

LAYERS, ROWS, WIDTH = 8, 32, 256


def compiled_text(fn, *args, **jit_kwargs):
  return jax.jit(fn, **jit_kwargs).lower(*args).compile().as_text()


def scanned_matmuls(x, w):
  def layer(h, w_layer):
    return jnp.tanh(h @ w_layer), None
  return jax.lax.scan(layer, x, w)[0]


def test_a_scanned_stack_counts_each_layer_once_and_reads_each_slice_once():
  x = jax.ShapeDtypeStruct((ROWS, WIDTH), jnp.float32)
  w = jax.ShapeDtypeStruct((LAYERS, WIDTH, WIDTH), jnp.float32)
  r = roofline.of_hlo(compiled_text(scanned_matmuls, x, w))
  assert r.flops == LAYERS * 2 * ROWS * WIDTH * WIDTH  # the loop's trip count, not once
  stack = LAYERS * WIDTH * WIDTH * 4
  # Every layer's weights are read (XLA:CPU copies each slice out first, then multiplies);
  # counting the whole stack where a fusion reads one layer's slice of it would make that
  # LAYERS times the stack.
  assert stack <= r.bytes < LAYERS * stack / 2, (r.bytes, stack)
  assert r.loops_counted_once == 0  # the compiler knows a scan's trip count
  assert r.seconds(peak_flops=1e15, bandwidth=1e9) == pytest.approx(r.bytes / 1e9, rel=0.05)
  assert r.seconds(peak_flops=1e3, bandwidth=1e15) == pytest.approx(r.flops / 1e3, rel=1e-6)


def test_a_donated_buffer_updated_in_place_costs_the_update():
  def write(buffer, update, row):
    return jax.lax.dynamic_update_slice(buffer, update, (row, 0))
  buffer = jax.ShapeDtypeStruct((4096, WIDTH), jnp.float32)
  update = jax.ShapeDtypeStruct((8, WIDTH), jnp.float32)
  row = jax.ShapeDtypeStruct((), jnp.int32)
  r = roofline.of_hlo(compiled_text(write, buffer, update, row, donate_argnums=0))
  update_bytes = 8 * WIDTH * 4
  # Read the update and write it, not the buffer.
  assert 2 * update_bytes <= r.bytes <= 3 * update_bytes, r.bytes
  assert r.flops == 0


def test_array_bytes_of_hlo_shapes():
  assert roofline.array_bytes("bf16[8,128]{1,0}") == 8 * 128 * 2
  assert roofline.array_bytes("(f32[2,3]{1,0}, s8[16]{0}, pred[])") == 24 + 16 + 1
  assert roofline.array_bytes("s4[10]{0}") == 5
  assert roofline.array_bytes("token[]") == 0


# A GPU program as XLA's GPU compiler writes it: cuDNN's attention forward and backward for
# queries [B, S, H, D] = [2, 128, 4, 64] over 256 keys, a cuBLAS product whose left operand
# has its contracting dimension given in the call's backend config (and a 4 MiB workspace),
# and an all-gather of its result over 8 devices, started and awaited.
GPU_HLO = """HloModule step

ENTRY %main (q: bf16[2,128,4,64], k: bf16[2,256,4,64], v: bf16[2,256,4,64], a: bf16[64,512], b: bf16[512,32]) -> (bf16[2,128,4,64], bf16[2,128,4,64], f32[512,32]) {
  %q = bf16[2,128,4,64]{3,2,1,0} parameter(0)
  %k = bf16[2,256,4,64]{3,2,1,0} parameter(1)
  %v = bf16[2,256,4,64]{3,2,1,0} parameter(2)
  %a = bf16[64,512]{1,0} parameter(3)
  %b = bf16[512,32]{1,0} parameter(4)
  %fwd = (bf16[2,128,4,64]{3,2,1,0}, f32[2,4,128]{2,1,0}, u8[0]{0}) custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaSoftmax"
  %out = bf16[2,128,4,64]{3,2,1,0} get-tuple-element(%fwd), index=0
  %bwd = (bf16[2,128,4,64]{3,2,1,0}, u8[0]{0}) custom-call(%q, %k, %v, %out), custom_call_target="__cudnn$fmhaSoftmaxBackward"
  %dq = bf16[2,128,4,64]{3,2,1,0} get-tuple-element(%bwd), index=0
  %gemm = (f32[64,32]{1,0}, s8[4194304]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  %c = f32[64,32]{1,0} get-tuple-element(%gemm), index=0
  %gather = ((f32[64,32]{1,0}), f32[512,32]{1,0}) all-gather-start(%c), dimensions={0}, replica_groups={{0,1,2,3,4,5,6,7}}
  %gathered = f32[512,32]{1,0} all-gather-done(%gather)
  ROOT %t = (bf16[2,128,4,64]{3,2,1,0}, bf16[2,128,4,64]{3,2,1,0}, f32[512,32]{1,0}) tuple(%out, %dq, %gathered)
}
"""


def test_cudnn_attention_and_cublas_products_are_counted():
  kernels = {k.name: k for k in roofline.of_hlo(GPU_HLO).kernels}
  # Parameters, tuples and an async operation's "done" run no kernel.
  assert set(kernels) == {"fwd", "bwd", "gemm", "gather"}
  products = 2 * 2 * 128 * 256 * 4 * 64  # one [S x D] by [D x T] product per batch and head
  assert kernels["fwd"].flops == 2 * products  # scores, then values
  assert kernels["bwd"].flops == 5 * products
  assert kernels["gemm"].flops == 2 * 64 * 512 * 32
  q, kv = 2 * 128 * 4 * 64 * 2, 2 * 256 * 4 * 64 * 2
  assert kernels["fwd"].bytes == q + 2 * kv + q + 2 * 4 * 128 * 4  # reads, then its outputs
  result = 64 * 32 * 4
  assert kernels["gemm"].bytes == 64 * 512 * 2 + 512 * 32 * 2 + result  # not the workspace
  assert kernels["gather"].bytes == result + 8 * result  # its operand once, and the whole


def test_causal_cudnn_attention_does_half_the_products():
  """XLA prints the call's backend config as spaced JSON ("mask_type": "CAUSAL")."""
  causal = GPU_HLO.replace(
      'custom_call_target="__cudnn$fmhaSoftmax"',
      'custom_call_target="__cudnn$fmhaSoftmax", backend_config={"cudnn_fmha_backend_config": '
      '{"is_flash_attention": true, "mask_type": "CAUSAL"}}')
  full = {k.name: k for k in roofline.of_hlo(GPU_HLO).kernels}
  half = {k.name: k for k in roofline.of_hlo(causal).kernels}
  assert half["fwd"].flops == full["fwd"].flops / 2
  assert half["bwd"].flops == full["bwd"].flops  # no backend config given: the full square


# An async fusion as XLA:GPU (jax 0.11.2, an H200) compiles a scan's write of one layer's
# activations into the stacked buffer the backward pass reads: fusion-start/fusion-done
# around a fused dynamic-update-slice, in place.
ASYNC_FUSION_HLO = """HloModule step

%fused_dynamic_update_slice (param_0: bf16[12,64,1024], param_1: s32[], param_2: bf16[64,1024]) -> bf16[12,64,1024] {
  %param_0 = bf16[12,64,1024]{2,1,0} parameter(0)
  %param_2 = bf16[64,1024]{1,0} parameter(2)
  %bitcast = bf16[1,64,1024]{2,1,0} bitcast(%param_2)
  %param_1 = s32[] parameter(1)
  %zero = s32[] constant(0)
  ROOT %dynamic_update_slice = bf16[12,64,1024]{2,1,0} dynamic-update-slice(%param_0, %bitcast, %param_1, %zero, %zero)
}

ENTRY %main (stack: bf16[12,64,1024], i: s32[], x: bf16[64,1024]) -> bf16[12,64,1024] {
  %stack = bf16[12,64,1024]{2,1,0} parameter(0)
  %i = s32[] parameter(1)
  %x = bf16[64,1024]{1,0} parameter(2)
  %fusion-start = ((bf16[12,64,1024]{2,1,0}, s32[], bf16[64,1024]{1,0}), bf16[12,64,1024]{2,1,0}, u32[]) fusion-start(%stack, %i, %x), kind=kLoop, calls=%fused_dynamic_update_slice
  ROOT %fusion-done = bf16[12,64,1024]{2,1,0} fusion-done(%fusion-start)
}
"""


def test_an_async_fusion_costs_what_its_fused_computation_moves():
  (kernel,) = roofline.of_hlo(ASYNC_FUSION_HLO).kernels
  update = 64 * 1024 * 2
  # The layer's slice read and written (and the index), not the 12 layers' buffer twice.
  assert kernel.name == "fusion-start"
  assert 2 * update <= kernel.bytes <= 2 * update + 8, kernel.bytes


def test_only_the_dearer_branch_of_a_conditional_counts():
  def either(heavy, x):
    return jax.lax.cond(heavy, lambda x: jnp.tanh(x @ x.T) @ x, lambda x: x * 2, x)
  x = jax.ShapeDtypeStruct((WIDTH, WIDTH), jnp.float32)
  r = roofline.of_hlo(compiled_text(either, jax.ShapeDtypeStruct((), bool), x))
  assert r.flops == 2 * (2 * WIDTH ** 3)  # the two products of the heavy branch, once


# A loop without the compiler's known trip count (as a `lax.while_loop` on data) around a
# conditional written with true/false computations.
LOOP_HLO = """HloModule loop

%heavy (a: f32[64,64]) -> f32[64,64] {
  %a = f32[64,64]{1,0} parameter(0)
  ROOT %d = f32[64,64]{1,0} dot(%a, %a), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%light (b: f32[64,64]) -> f32[64,64] {
  %b = f32[64,64]{1,0} parameter(0)
  ROOT %n = f32[64,64]{1,0} negate(%b)
}

%body (s: (s32[], f32[64,64])) -> (s32[], f32[64,64]) {
  %s = (s32[], f32[64,64]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %x = f32[64,64]{1,0} get-tuple-element(%s), index=1
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  %odd = pred[] compare(%i, %one), direction=EQ
  %y = f32[64,64]{1,0} conditional(%odd, %x, %x), true_computation=%light, false_computation=%heavy
  ROOT %t = (s32[], f32[64,64]{1,0}) tuple(%next, %y)
}

%cond (c: (s32[], f32[64,64])) -> pred[] {
  %c = (s32[], f32[64,64]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%c), index=0
  %five = s32[] constant(5)
  ROOT %lt = pred[] compare(%j, %five), direction=LT
}

ENTRY %main (x0: f32[64,64]) -> (s32[], f32[64,64]) {
  %x0 = f32[64,64]{1,0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[64,64]{1,0}) tuple(%zero, %x0)
  ROOT %w = (s32[], f32[64,64]{1,0}) while(%init), condition=%cond, body=%body
}
"""


def test_a_loop_of_unknown_trip_count_is_counted_once_and_said_so():
  r = roofline.of_hlo(LOOP_HLO)
  assert r.loops_counted_once == 1
  dot = next(k for k in r.kernels if k.opcode == "dot")
  assert dot.runs == 1 and dot.flops == 2 * 64 ** 3  # the dearer branch
  assert not [k for k in r.kernels if k.opcode == "negate"]  # the cheaper one is not added


# A fusion that reads one row of a [1024, 256] table through a bitcast of it.
VIEW_HLO = """HloModule view

%fused_row (table: f32[1024,256], i: s32[]) -> f32[1,256] {
  %table = f32[1024,256]{1,0} parameter(0)
  %i = s32[] parameter(1)
  %flat = f32[1024,16,16]{2,1,0} bitcast(%table)
  %zero = s32[] constant(0)
  %row = f32[1,16,16]{2,1,0} dynamic-slice(%flat, %i, %zero, %zero), dynamic_slice_sizes={1,16,16}
  ROOT %out = f32[1,256]{1,0} bitcast(%row)
}

ENTRY %main (t: f32[1024,256], j: s32[]) -> f32[1,256] {
  %t = f32[1024,256]{1,0} parameter(0)
  %j = s32[] parameter(1)
  ROOT %f = f32[1,256]{1,0} fusion(%t, %j), kind=kLoop, calls=%fused_row
}
"""


def test_a_fusion_slicing_through_a_bitcast_reads_the_slice():
  (kernel,) = roofline.of_hlo(VIEW_HLO).kernels
  assert kernel.bytes == 256 * 4 + 4 + 256 * 4  # the row and the index read, the row written


# A fusion that reads the first 128 positions of one layer's slice of a stacked cache
# [4, 1024, 256], as a decode step's segment does (parti_jax.decoding).
PREFIX_HLO = """HloModule prefix

%fused_prefix (cache: f32[4,1024,256], layer: s32[]) -> f32[128,256] {
  %cache = f32[4,1024,256]{2,1,0} parameter(0)
  %layer = s32[] parameter(1)
  %zero = s32[] constant(0)
  %slab = f32[1,1024,256]{2,1,0} dynamic-slice(%cache, %layer, %zero, %zero), dynamic_slice_sizes={1,1024,256}
  %flat = f32[1024,256]{1,0} bitcast(%slab)
  %first = f32[128,256]{1,0} slice(%flat), slice={[0:128], [0:256]}
  ROOT %out = f32[128,256]{1,0} negate(%first)
}

ENTRY %main (c: f32[4,1024,256], l: s32[]) -> f32[128,256] {
  %c = f32[4,1024,256]{2,1,0} parameter(0)
  %l = s32[] parameter(1)
  ROOT %f = f32[128,256]{1,0} fusion(%c, %l), kind=kLoop, calls=%fused_prefix
}
"""


def test_a_slice_of_a_slice_reads_the_inner_one():
  (kernel,) = roofline.of_hlo(PREFIX_HLO).kernels
  # The 128 positions read, the index, the 128 written: not the layer's 1,024 positions.
  assert kernel.bytes == 128 * 256 * 4 + 4 + 128 * 256 * 4
