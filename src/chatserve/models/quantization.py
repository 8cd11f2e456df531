"""How Linear weights are stored and multiplied on the CPU. Weight-only quantization: int8 (a scale
per block of 32 inputs, as Q8_0, or per output channel) or int4 (groups of 32 along the input, a
scale and a zero point each), and int8 embeddings that look rows up and scale them. Float layouts:
NativeFloatLinear (fp32/bf16 tiles), SplitLinear (fp32, one block of outputs per thread) and
PackedLinear (bf16, oneDNN's layout). All share StoredLinear's flattening and bias.

Where the native kernels are loaded (models/native.py), int8, int4 and float layers take their tiled
layouts and run every step on them (`native`, `native_call()`); elsewhere PyTorch's kernels run.
PyTorch's weight-only kernels (`aten._weight_int8pack_mm`, `aten._weight_int4pack_mm_for_cpu`) are
fast only with bfloat16 activations (measured on 2 threads, one token: 576x1536 int4 56 us with bf16
input, 776 us with fp32), so a quantized layer there takes any input dtype, multiplies in bf16 and
gives the input's dtype back. For many rows at once (prefill) a plain bf16 GEMM beats the int8 kernel, so
Int8Linear dequantizes there (128 rows of 576x1536: 755 us against 1631 us)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# Values of EngineConfig.quantization (and --quantization): None keeps the checkpoint's own form
# (float safetensors stay float; a GGUF's quantized blocks run quantized), "none" dequantizes
# everything to the run dtype.
QUANTIZATION_METHODS = ("int8", "int4", "none")
INT4_GROUP_SIZE = 32
COMPUTE_DTYPE = torch.bfloat16
# Above this many rows Int8Linear dequantizes its weight and runs a bf16 GEMM instead of the kernel.
INT8_KERNEL_MAX_ROWS = 16
# Rows quantized or packed at a time: the temporaries stay small even for a 150k-row embedding.
ROWS_PER_SLAB = 4096


def tiles_fit(weight_shape: tuple[int, int], group: int) -> bool:
    """Whether a quantized weight tiles: every kernel packs outputs in tiles of 16 and inputs in whole
    groups (blocks) of scales."""
    out_features, in_features = weight_shape
    return out_features % 16 == 0 and in_features % group == 0


def check_supported(method: Optional[str], device: torch.device) -> None:
    if method not in (None, *QUANTIZATION_METHODS):
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)}, got {method!r}")
    if method in ("int8", "int4") and device.type != "cpu":
        raise ValueError(f"--quantization {method} runs on the CPU only (PyTorch's weight-only CPU kernels); "
                         f"on {device.type} run --quantization none with --dtype bfloat16")


class StoredLinear(nn.Module):
    """A Linear whose weight is stored in a layout of its own: what every such layer shares is the
    flattening of the input to rows, the bias and the shape back. Subclasses define matmul(rows),
    which adds the bias itself where bias_in_matmul says so (a kernel that fuses it)."""

    bias_in_matmul = False
    native = False  # on a native kernel: native_call() gives it, the bias added inside

    def __init__(self, in_features: int, out_features: int, bias: Optional[torch.Tensor]):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # Registered even when None: a bias that arrives after the weight is set as a parameter.
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias, requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if self.native:  # any activation dtype in, the same out
            op, args = self.native_call()
            out = op(rows, *args, self.bias, None)
        else:
            out = self.matmul(rows)
            if self.bias is not None and not self.bias_in_matmul:
                out = out + self.bias
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.out_features)

    def matmul(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def native_call(self) -> tuple:
        """(op, args) of a layer on a native kernel: op(rows, *args, bias, out_dtype) is its matmul
        with the bias, in out_dtype (None: the rows' dtype)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class QuantizedLinear(StoredLinear):
    """What Int8Linear and Int4Linear share: the kernels take bf16 rows, whatever the run dtype."""

    def matmul(self, rows: torch.Tensor) -> torch.Tensor:
        # Dtype checks in Python: a no-op .to() still costs a dispatch, and decode runs 4 per layer.
        if rows.dtype == COMPUTE_DTYPE:
            return self.kernel(rows)
        return self.kernel(rows.to(COMPUTE_DTYPE)).to(rows.dtype)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Int8Linear(QuantizedLinear):
    """weight [out, in] int8 with scales: w = q * scale, one scale per output row or one per block of
    32 inputs (Q8_0's blocks). Kept in one of two layouts: PyTorch's (`qweight` row-major, scales
    [out]: _weight_int8pack_mm for a few rows, a dequantized bf16 GEMM for more; block scales are
    requantized per row), or, with native=True, the native kernel's (models/native.py: tiles of 16
    outputs, `packed` and fp16 `block_scales`, int8 activations and AVX-512 VNNI dot products, every
    row count, any input dtype in and out, the bias added inside)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 native: bool = False):
        """qweight [out, in] int8 (or [out, in / 32, 32], any strides: a view of a file's blocks);
        scales [out] or [out, in / 32]."""
        out_features = qweight.shape[0]
        in_features = qweight.shape[1] * (qweight.shape[2] if qweight.dim() == 3 else 1)
        super().__init__(in_features, out_features, bias)
        self.native = native and self.fits((out_features, in_features))
        if self.native:
            from . import native as native_kernels

            self.ops = native_kernels.ops()
            blocks = scales if scales.dim() == 2 else scales[:, None].expand(out_features, in_features // 32)
            packed = torch.empty(out_features * in_features, dtype=torch.uint8)
            block_scales = torch.empty(out_features * in_features // 32, dtype=torch.float16)
            # A slab of rows at a time (a multiple of 16 rows is a contiguous range of tiles): a strided
            # view of a file's blocks is copied a slab at a time, not whole.
            for start in range(0, out_features, ROWS_PER_SLAB):
                rows = qweight[start:start + ROWS_PER_SLAB]
                p, s = self.ops.int8_pack(rows.reshape(len(rows), in_features), blocks[start:start + len(rows)])
                packed[start * in_features:start * in_features + p.numel()] = p
                block_scales[start * in_features // 32:start * in_features // 32 + s.numel()] = s
            self.register_buffer("packed", packed)
            self.register_buffer("block_scales", block_scales)
            return
        qweight = qweight.reshape(out_features, in_features)
        if scales.dim() == 2:  # block scales: one per row for PyTorch's kernel
            qweight, scales = quantize_int8(dequantize_int8_blocks(qweight, scales))
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.to(COMPUTE_DTYPE).contiguous())

    @staticmethod
    def fits(weight_shape: tuple[int, int]) -> bool:
        return tiles_fit(weight_shape, 32)

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, native: bool = False) -> "Int8Linear":
        """Per block of 32 inputs for the native layout (as Q8_0), per output row for PyTorch's."""
        if native and cls.fits(tuple(weight.shape)):
            return cls(*quantize_int8(weight, block=32), bias, native)
        return cls(*quantize_int8(weight), bias)

    def native_call(self) -> tuple:
        return self.ops.int8_gemm.default, (self.packed, self.block_scales, self.out_features)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= INT8_KERNEL_MAX_ROWS:
            return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales)
        return F.linear(x, self.qweight.to(COMPUTE_DTYPE)) * self.scales

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, native={self.native}"


class Int4Linear(QuantizedLinear):
    """weight [out, in] in 4 bits, in groups of `group_size` along `in`: w = (q - 8) * scale + zero,
    q in [0, 15]. Kept in one of two layouts: PyTorch's (`packed` for _weight_int4pack_mm_for_cpu,
    scales_and_zeros [in / group, out, 2]), or, with native=True, the native kernel's (models/native.py:
    int8 activations and AVX-512 VNNI dot products, 2-4x PyTorch's kernel at every batch size,
    prefill included; `packed` and `scales`: bf16 scales and mins, w = q * scale + min, or, when
    every zero is 0 (Q4_0's blocks), Q4_0's fp16 scales alone: 9/16 of a byte a weight, not 10/16)."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 bias: Optional[torch.Tensor] = None, native: bool = False):
        """q: [out, in] integers in [0, 15]; scales, zeros: [out, in / group_size]."""
        out_features, in_features = q.shape
        super().__init__(in_features, out_features, bias)
        self.group_size = group_size
        self.native = native and group_size == 32
        if self.native:
            from . import native as native_kernels

            self.ops = native_kernels.ops()
            mins = zeros - 8 * scales if zeros.any() else None
            packed, packed_scales = self.ops.int4_pack(q, scales, mins)
            self.register_buffer("packed", packed)
            self.register_buffer("scales", packed_scales)
            return
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros",
                             torch.stack([scales.t(), zeros.t()], dim=-1).to(COMPUTE_DTYPE).contiguous())

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 group_size: int = INT4_GROUP_SIZE, native: bool = False) -> "Int4Linear":
        return cls(*quantize_int4(weight, group_size), group_size, bias, native)

    @staticmethod
    def fits(weight_shape: tuple[int, int], group_size: int = INT4_GROUP_SIZE) -> bool:
        return tiles_fit(weight_shape, group_size)

    def native_call(self) -> tuple:
        return self.ops.int4_gemm.default, (self.packed, self.scales, self.out_features)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_and_zeros)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}, native={self.native}"


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 rows with one scale each (the int8 head's own layout, so a
    tied model's embedding and head can share it)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales.to(COMPUTE_DTYPE))
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].to(self.dtype) * self.scales[ids].to(self.dtype).unsqueeze(-1)


class NativeInt8Embedding(nn.Module):
    """An embedding read from a native Int8Linear's tiles (a tied model's head, so one copy serves
    both): row v is output v, its bytes less 128 times its blocks' scales."""

    def __init__(self, table: Int8Linear, dtype: torch.dtype):
        super().__init__()
        n, k = table.out_features, table.in_features
        self.register_buffer("tiles", table.packed.view(n // 16, k // 4, 16, 4))
        self.register_buffer("scales", table.block_scales.view(n // 16, k // 32, 16))
        self.dim, self.dtype = k, dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        tile, lane = ids // 16, ids % 16
        q = self.tiles[tile, :, lane, :].reshape(*ids.shape, self.dim // 32, 32).float() - 128
        values = q * self.scales[tile, :, lane].float().unsqueeze(-1)
        return values.reshape(*ids.shape, self.dim).to(self.dtype)


def quantize_int8(weight: torch.Tensor, block: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8: the largest magnitude of each row (or of each block of `block` inputs, as
    Q8_0) maps to 127. Scales [out] or [out, in / block]."""
    out_features, in_features = weight.shape
    width = block or in_features
    q = torch.empty(weight.shape, dtype=torch.int8)
    scales = torch.empty(out_features, in_features // width)
    for start in range(0, out_features, ROWS_PER_SLAB):
        w = weight[start:start + ROWS_PER_SLAB].float().reshape(-1, in_features // width, width)
        s = w.abs().amax(dim=-1).clamp(min=1e-10) / 127
        q[start:start + len(w)] = torch.round(w / s.unsqueeze(-1)).clamp_(-128, 127).view(len(w), -1)
        scales[start:start + len(w)] = s
    return q, (scales if block else scales[:, 0])


def dequantize_int8_blocks(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """q [out, in] int8 with scales [out, in / 32] -> fp32 [out, in]."""
    return (q.reshape(q.shape[0], -1, 32).float() * scales.float().unsqueeze(-1)).reshape(q.shape[0], -1)


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group: each group's min..max maps onto 0..15."""
    out_features, in_features = weight.shape
    groups = in_features // group_size
    q = torch.empty(weight.shape, dtype=torch.uint8)
    scales, zeros = torch.empty(out_features, groups), torch.empty(out_features, groups)
    for start in range(0, out_features, ROWS_PER_SLAB):
        w = weight[start:start + ROWS_PER_SLAB].float()
        w = w.reshape(len(w), groups, group_size)
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        s = ((hi - lo) / 15).clamp(min=1e-10)
        q[start:start + len(w)] = torch.round((w - lo.unsqueeze(-1)) / s.unsqueeze(-1)).clamp_(0, 15).view(len(w), -1)
        # The kernel computes (q - 8) * scale + zero; q * scale + lo is the same with zero = lo + 8 * scale.
        scales[start:start + len(w)], zeros[start:start + len(w)] = s, lo + 8 * s
    return q, scales, zeros


def quantize_linear(method: str, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                    native: bool = False) -> QuantizedLinear:
    """A float weight [out, in] as a quantized Linear; int4 falls back to int8 where the kernel's
    tiling does not fit the shape. native: on the native integer kernels."""
    if method == "int4" and Int4Linear.fits(tuple(weight.shape)):
        return Int4Linear.quantize(weight, bias, native=native)
    return Int8Linear.quantize(weight, bias, native=native)


class SplitLinear(StoredLinear):
    """A float Linear on the CPU whose weight is kept as `parts` blocks of output columns,
    [parts, in, out / parts], multiplied as a batch. MKL runs a one-row fp32 matmul (every decode
    step) on a single thread at about half the memory bandwidth; a batched matmul gives each thread a block
    (30 layers of 576x3072 fp32, one row, 2 threads: 8.5 ms, against 12.3 ms column-major and
    23.4 ms row-major; 32 rows 33 against 41 ms; 512 rows alike). bf16 gains nothing this way."""

    def __init__(self, blocks: torch.Tensor, bias: Optional[torch.Tensor] = None):
        parts, in_features, block = blocks.shape
        super().__init__(in_features, parts * block, bias)
        self.parts = parts
        self.register_buffer("blocks", blocks)

    @staticmethod
    def split(weight: torch.Tensor, parts: int) -> torch.Tensor:
        """weight [out, in] -> blocks [parts, in, out / parts]: block p holds outputs p*n..(p+1)*n-1."""
        out_features, in_features = weight.shape
        return weight.t().reshape(in_features, parts, out_features // parts).permute(1, 0, 2).contiguous()

    def matmul(self, rows: torch.Tensor) -> torch.Tensor:
        out = torch.matmul(rows, self.blocks)  # [parts, rows, out / parts], a thread per block
        return out.permute(1, 0, 2).reshape(rows.shape[0], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, parts={self.parts}"


class SplitEmbedding(nn.Module):
    """A tied model's embedding read from its head's SplitLinear blocks: row v is output column v."""

    def __init__(self, blocks: torch.Tensor):
        super().__init__()
        self.register_buffer("blocks", blocks)
        self.block = blocks.shape[2]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.blocks[ids // self.block, :, ids % self.block]


class NativeFloatLinear(StoredLinear):
    """An fp32 or bf16 Linear on the native kernel (models/native.py): the weight in tiles of 16
    outputs, each output's inputs (pairs for bf16, vdpbf16ps's operand) side by side, so the outputs
    sit in the vector lanes and every thread streams its tiles. On 2 threads, one row (a decode
    step): bf16 1.5-2.3x oneDNN's packed layout; 32 and 512 rows at par."""

    native = True  # the bias added in fp32 inside the kernel, as F.linear does

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, bias: Optional[torch.Tensor] = None):
        super().__init__(weight.shape[1], weight.shape[0], bias)
        from . import native

        self.ops = native.ops()
        self.register_buffer("packed", self.ops.float_pack(weight, dtype))  # converted as it packs

    @staticmethod
    def fits(shape: tuple) -> bool:
        return len(shape) == 2 and shape[0] % 16 == 0 and shape[1] % 2 == 0

    def native_call(self) -> tuple:
        return self.ops.float_gemm.default, (self.packed, self.out_features)


class NativeFloatEmbedding(nn.Module):
    """A tied model's embedding read from its head's NativeFloatLinear layout: row v is output v."""

    def __init__(self, head: NativeFloatLinear):
        super().__init__()
        self.register_buffer("tiles", head.packed)  # [vocab / 16, dim / g, 16, g]
        self.dim = head.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tiles[ids // 16, :, ids % 16, :].reshape(*ids.shape, self.dim)


class PackedLinear(StoredLinear):
    """A bf16 Linear on the CPU with its weight reordered once into oneDNN's blocked layout, so
    each call skips the reorder that F.linear pays for a plain weight: 30 layers of 576x3072 bf16
    on 2 threads take 6.0 ms for one row against 9.7 ms, 12.4 against 20.6 ms for 32 rows and 141
    against 167 ms for 512, with the same results. (For fp32, SplitLinear does better on one row.)"""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
        super().__init__(weight.shape[1], weight.shape[0], bias)
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight, 1))

    @staticmethod
    def available() -> bool:
        return torch.backends.mkldnn.is_available()

    bias_in_matmul = True  # added in fp32 inside the kernel, as F.linear does

    def matmul(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [None], "")
