"""KV memory and the attention kernels over it.

StaticKVCache: per layer, one preallocated [batch, kv_heads, max_seq_len, head_dim] buffer for keys
and one for values. Every row of the batch has its own positions, so prompts of different lengths
share a batch without padding changing any row's result: row b writes its keys at its own positions
and a query at position p sees exactly the keys at positions <= p (and > p - window with a sliding
window). Slots a row has not written yet (or that hold a shorter prompt's padding) sit at positions
> p, so the causal mask hides them until the row overwrites them with its own tokens.

How the model uses a cache (model.py knows nothing else about it):
    meta = cache.prepare(input_pos)                        # once per forward: the masks
    y = cache.layers[i].attend(q, k, v, input_pos, meta)   # per layer: store k, v; attend over all
Each layer gets its own small object holding its own tensors, so a compiled Block sees the same
code and shapes on every layer and compiles once.

PagedKVCache: the serving pool. Keys and values live in fixed-size blocks of one big tensor per layer;
each sequence has a block table (list of block ids); BlockAllocator keeps the free list, reference counts
(shared prompt blocks, copy-on-write) and the prefix cache (full blocks keyed by a hash chain of their
tokens, evicted least recently used). Attention over block tables runs through FlexAttention: a BlockMask
per step lists each query block's physical blocks (the kernel reads only those) and a mask_mod makes the
causal cut. The scheduler (scheduler.py) decides who runs; this file owns the memory.
"""
import functools
import math
import os
from collections import OrderedDict, deque

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

import cpu_kernels
import cuda_kernels
import gemv  # pdl_supported: whether kernels may launch early (programmatic dependent launch)


class LayerKV:
    """One layer's keys and values [B, Hkv, S, D], and whether it uses the sliding window."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, windowed: bool):
        self.k, self.v, self.windowed = k, v, windowed

    def attend(self, q, k, v, input_pos, meta):
        # q [B, H, T, D]; k, v [B, Hkv, T, D] are written at input_pos [B, T] of each row
        if meta is not None and isinstance(meta[0], str):  # ("kernel" | "cuda_kernel" | "cpu_kernel", pos, window)
            window = meta[2] if self.windowed else 0
            if meta[0] == "cpu_kernel":
                return torch.ops.flint.cpu_decode_attention(q, k, v, self.k, self.v, meta[1], window)  # stores k, v too
            return torch.ops.flint.decode_attention(q, k, v, self.k, self.v, meta[1], window, meta[0] == "cuda_kernel")
        B = q.shape[0]
        rows = torch.arange(B, device=q.device)[:, None]  # [B, 1] broadcasts against input_pos [B, T]
        self.k[rows, :, input_pos] = k.transpose(1, 2)  # the indexed view is [B, T, Hkv, D]
        self.v[rows, :, input_pos] = v.transpose(1, 2)
        if meta is None:  # fresh prefill: the new tokens are all there is
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        causal, windowed = meta
        mask = windowed if self.windowed else causal  # [B, 1, T, kv_len]
        kv_len = mask.shape[-1]
        keys, values = self.k[:B, :, :kv_len], self.v[:B, :, :kv_len]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)


class StaticKVCache:
    def __init__(self, args, batch_size: int, max_seq_len: int, device=None, dtype=torch.float32,
                 cuda_attention: bool = False):
        shape = (batch_size, args.n_kv_heads, max_seq_len, args.head_dim)
        self.layers = [LayerKV(torch.zeros(shape, device=device, dtype=dtype),
                               torch.zeros(shape, device=device, dtype=dtype), args.uses_window(i))
                       for i in range(args.n_layers)]
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self.window = args.sliding_window
        # Attend over the first kv_len slots only. Eager decoding sets it to the longest row rounded
        # up (less to read); compiled decoding leaves it at max_seq_len so shapes never change.
        self.kv_len = max_seq_len
        # decode steps take cuda_kernels.decode_attention instead of the Triton kernels (see use_cuda_attention)
        self.cuda_attention = cuda_attention

    def attend_upto(self, n: int):
        """Attend over the first n slots, rounded up to a multiple of 64 so the shape changes rarely."""
        self.kv_len = min(self.max_seq_len, 64 * math.ceil(n / 64))

    @property
    def nbytes(self) -> int:
        return sum(layer.k.nbytes + layer.v.nbytes for layer in self.layers)

    def prepare(self, input_pos, fresh: bool = False):
        """fresh: every row starts at position 0 (a prefill from scratch). Then attention needs only
        the new tokens with a causal mask, which SDPA's flash kernel does without materialising one."""
        if fresh and (self.window is None or input_pos.shape[1] <= self.window):
            return None
        if input_pos.shape[1] == 1 and decode_kernel_available(self.layers[0].k):  # no masks: the kernels read positions
            kernel = "cuda_kernel" if use_cuda_attention(self.cuda_attention) else "kernel"
            return kernel, input_pos[:, 0], self.window or 0
        if input_pos.shape[1] == 1 and cpu_decode_available(self.layers[0].k):
            return "cpu_kernel", input_pos[:, 0], self.window or 0
        # input_pos [B, T] -> additive masks [B, 1, T, kv_len] (0 or -inf): causal, and causal within
        # the window. Made here once per step: SDPA would turn a boolean mask into this in every layer.
        k_pos = torch.arange(self.kv_len, device=input_pos.device)
        q_pos = input_pos[:, None, :, None]
        future = k_pos > q_pos  # [B, 1, T, kv_len]: the slots a query must not see
        too_old = future | (k_pos <= q_pos - self.window) if self.window is not None else None
        dtype = self.layers[0].k.dtype
        return tuple(None if m is None else torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(m, -math.inf)
                     for m in (future, too_old))

    def reset(self):
        for layer in self.layers:
            layer.k.zero_()
            layer.v.zero_()


# ---------------------------------------------------------------- decode attention (Triton, GPU)
# One query token per row over a static cache, up to the row's position: flash-decoding. The keys are
# cut into SPLIT-slot pieces; program (row, kv head, piece) scores the piece for the kv head's query
# heads at once (GQA: one read of K and V for all of them) and keeps an unnormalised partial result with
# its max and sum; a second kernel merges the pieces. Pieces past a row's position load nothing, and the
# piece holding the position stores the step's key and value (no separate cache-write kernels). SDPA
# (cuDNN) took ~9 us a layer for llama-3-8b at batch 1 whatever the position, plus two index_put kernels.
# Merging in the split kernel instead (the last program of a (row, kv head) to finish, after an atomic counter)
# measured slower on the H200: 5.5 against 3.7 us a call at batch 1, position 128, and llama-3-8b decode 244.6
# against 251.2 tok/s (int4 448 against 469): the merge kernel, launched early through PDL, costs less than
# the last program's round trips after the counter.
# cuda_kernels.decode_attention does it all in one kernel on sm_90 (a thread block cluster a (row, kv head), the
# pieces merged through distributed shared memory). Alone it is no faster than split + merge (4.3 against 4.1 us
# a layer at 385 slots); after cuda_kernels' int4 GEMV, which lets it start early, it is (9.7 against 10.7 us
# with that GEMV). So a cache takes it where it was asked to (StaticKVCache(cuda_attention=True): the Engine
# asks for int4 models at batch 1, where that GEMV runs), see use_cuda_attention.

# H200, llama-3-8b bf16 decode at batch 8 (benchmarks/decode_ablations.py): 64 slots and 4 warps a program beat
# 32 / 2 (0.3% slower), 32 / 1 and 64 / 8 (1.3%), also where timed alone 32 / 2 and 64 / 8 looked faster
DECODE_SPLIT = 64  # key slots per program
DECODE_WARPS = 4  # warps per program


def use_cuda_attention(asked: bool = False) -> bool:
    """Whether decode steps over a static cache on a GPU of compute capability 9.0 use cuda_kernels.decode_attention
    where it takes the shapes (bf16, head dim 64 or 128, at most 8 query heads a kv head) instead of the Triton
    kernels: where the cache asks (asked), unless FLINT_CUDA_ATTENTION says 1 (always) or 0 (never).
    H200, llama-3-8b: int4 g128 decode at batch 1 +1.7% with it (631.3-638.1 against 620.7-627.6 tok/s, three
    pairs); bf16 -0.1 to -0.9% (four pairs), int8 -1.0%, int4 at batch 8 -1.1% (one pair each), bf16 at batch 8 the
    same: so those keep the Triton kernels."""
    forced = os.environ.get("FLINT_CUDA_ATTENTION")
    return forced == "1" if forced in ("0", "1") else asked


DECODE_KERNEL_ON_CPU = False  # tests: run the kernels through Triton's interpreter on CPU tensors


def decode_kernel_available(t: torch.Tensor) -> bool:
    """Whether decode steps over a static cache holding t use decode_attention's kernels: a CUDA tensor,
    Triton importable, FLINT_DECODE_ATTENTION not 0."""
    if os.environ.get("FLINT_DECODE_ATTENTION", "1") == "0":
        return False
    if t.device.type != "cuda" and not (DECODE_KERNEL_ON_CPU and os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def cpu_decode_available(t: torch.Tensor) -> bool:
    """Whether decode steps over a static cache holding t use cpu_kernels.py's decode attention (a fp32 CPU
    cache, head_dim % 8 == 0, the kernels built, FLINT_DECODE_ATTENTION not 0): it reads the slots up to each
    row's position, where SDPA reads every slot with a mask (~150 us a layer at 385 slots on a 2-core CPU)."""
    return (t.device.type == "cpu" and t.dtype == torch.float32 and t.shape[-1] % 8 == 0
            and os.environ.get("FLINT_DECODE_ATTENTION", "1") != "0" and cpu_kernels.available())


@functools.cache
def _decode_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def split_kernel(q_ptr, kn_ptr, vn_ptr, k_ptr, v_ptr, pos_ptr, acc_ptr, ml_ptr, Hkv, S, WINDOW, scale,
                     sq_b, sq_h, skn_b, skn_h, svn_b, svn_h, s_pos, sk_b, sk_h, sk_s,
                     GROUP: tl.constexpr, G_PAD: tl.constexpr,
                     D: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr):
        # q [B, H, 1, D] (heads kvh*GROUP .. +GROUP share kv head kvh); the step's k, v [B, Hkv, 1, D];
        # the cache k, v [Bc, Hkv, S, D]
        bh = tl.program_id(0)  # b * Hkv + kvh
        piece = tl.program_id(1)
        b, kvh = bh // Hkv, bh % Hkv
        pos = tl.load(pos_ptr + b * s_pos)
        lo = tl.maximum(pos - WINDOW + 1, 0)  # WINDOW > S without a window
        rg = tl.arange(0, G_PAD)                                                 # [G]
        rd = tl.arange(0, D)
        rs = piece * SPLIT + tl.arange(0, SPLIT)                                 # [S]: key slots
        h = kvh * GROUP + rg
        seen = (rs <= pos) & (rs >= lo)                                          # [S]
        here = rs == pos  # the step's own slot: its key and value come from k_new, v_new (and are stored)
        kv_off = b * sk_b + kvh * sk_h + rs[:, None].to(tl.int64) * sk_s + rd[None, :]  # [S, D]
        # the cache's earlier slots were written by earlier steps: with PDL they load while the kernel
        # before this one (which writes q, k_new, v_new) still runs, and only then does this one wait
        k = tl.load(k_ptr + kv_off, mask=(seen & ~here)[:, None], other=0.0)
        v = tl.load(v_ptr + kv_off, mask=(seen & ~here)[:, None], other=0.0)
        if PDL:
            tl.extra.cuda.gdc_wait()
        q = tl.load(q_ptr + b * sq_b + h[:, None] * sq_h + rd[None, :], mask=rg[:, None] < GROUP, other=0.0)
        k_new = tl.load(kn_ptr + b * skn_b + kvh * skn_h + rd)                   # [D]
        v_new = tl.load(vn_ptr + b * svn_b + kvh * svn_h + rd)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        k = tl.where(here[:, None], k_new[None, :], k)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale      # [G, S] fp32
        scores = tl.where(seen[None, :], scores, float("-inf"))
        m = tl.max(scores, axis=1)                                               # [G]
        p = tl.exp(scores - tl.where(m == float("-inf"), 0.0, m)[:, None])       # 0 where nothing is seen
        v = tl.where(here[:, None], v_new[None, :], v)
        acc = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)               # [G, D]
        n_pieces = tl.num_programs(1)
        out = (b * Hkv * GROUP + h) * n_pieces + piece                           # [G]: row of (b, head, piece)
        keep = rg < GROUP
        tl.store(acc_ptr + out[:, None] * D + rd[None, :], acc, mask=keep[:, None])
        tl.store(ml_ptr + out * 2, m, mask=keep)
        tl.store(ml_ptr + out * 2 + 1, tl.sum(p, axis=1), mask=keep)
        # the piece holding pos stores the step's key and value (no other program reads that slot)
        mine = (rd * 0 + pos // SPLIT) == piece                                  # [D], all true or all false
        slot = b * sk_b + kvh * sk_h + pos.to(tl.int64) * sk_s + rd
        tl.store(k_ptr + slot, k_new, mask=mine)
        tl.store(v_ptr + slot, v_new, mask=mine)

    @triton.jit
    def merge_kernel(acc_ptr, ml_ptr, o_ptr, so_b, so_h, H, PIECES, D: tl.constexpr, P_PAD: tl.constexpr,
                     PDL: tl.constexpr):
        # one program per (b, head): o = sum_p e^(m_p - M) acc_p / sum_p e^(m_p - M) l_p
        bh = tl.program_id(0)
        rp = tl.arange(0, P_PAD)
        rd = tl.arange(0, D)
        in_p = rp < PIECES
        if PDL:  # launched early (hides the launch), reads nothing before split_kernel is done
            tl.extra.cuda.gdc_wait()
        m = tl.load(ml_ptr + (bh * PIECES + rp) * 2, mask=in_p, other=float("-inf"))
        l = tl.load(ml_ptr + (bh * PIECES + rp) * 2 + 1, mask=in_p, other=0.0)
        w = tl.exp(m - tl.max(m, axis=0))                                        # [P]
        acc = tl.load(acc_ptr + (bh * PIECES + rp)[:, None] * D + rd[None, :], mask=in_p[:, None], other=0.0)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        o = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)             # [D]
        b, h = bh // H, bh % H
        tl.store(o_ptr + b * so_b + h * so_h + rd, o.to(o_ptr.dtype.element_ty))

    return split_kernel, merge_kernel


@torch.library.custom_op("flint::decode_attention", mutates_args=("k_cache", "v_cache"))
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     pos: torch.Tensor, window: int, cuda: bool = False) -> torch.Tensor:
    """One decode step's attention over a static cache, storing the step's keys and values on the way:
    q [B, H, 1, D]; k, v [B, Hkv, 1, D] (this step's, stored at slot pos[b] of row b); k_cache, v_cache
    [Bc >= B, Hkv, S, D]; pos [B] -> [B, H, 1, D]: softmax(q k^T / sqrt(D)) v over slots lo..pos[b]
    (lo = pos - window + 1 with a window > 0, else 0). D a power of two. cuda: through cuda_kernels.decode_attention
    (one kernel) where it takes the shapes, else the Triton split and merge kernels."""
    B, H, _, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    group = H // Hkv
    pieces = -(-S // DECODE_SPLIT)
    # any strides but a unit one along D: the step's q, k, v are views into the qkv matmul's output (a copy
    # each would be three more kernels a layer at batch > 1, where those views are not contiguous)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("decode_attention: the key and value caches must have the same strides, unit along D")
    out = torch.empty(B, H, 1, D, dtype=q.dtype, device=q.device)
    pdl = (q.is_cuda and os.environ.get("FLINT_ATTN_PDL", "1") != "0"
           and gemv.pdl_supported(q.device.index if q.device.index is not None else torch.cuda.current_device()))
    if (q.is_cuda and cuda and cuda_kernels.attention_available(q.device)
            and cuda_kernels.attention_supports(q, k, v, k_cache, v_cache, pos)):
        cuda_kernels.decode_attention(q, k, v, k_cache, v_cache, pos, window, out, pdl)  # one kernel (sm_90)
        return out
    acc = torch.empty(B, H, pieces, D, dtype=torch.float32, device=q.device)  # unnormalised partial outputs
    ml = torch.empty(B, H, pieces, 2, dtype=torch.float32, device=q.device)  # their max and sum
    split, merge = _decode_kernels()
    pdl_args = {"PDL": True, "launch_pdl": True} if pdl else {"PDL": False}
    split[(B * Hkv, pieces)](q, k, v, k_cache, v_cache, pos, acc, ml, Hkv, S, window if window > 0 else S + 1,
                             1.0 / math.sqrt(D), q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                             v.stride(0), v.stride(1), pos.stride(0),
                             k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                             GROUP=group, G_PAD=max(16, 1 << (group - 1).bit_length()), D=D, SPLIT=DECODE_SPLIT,
                             PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32: no TF32
                             num_warps=DECODE_WARPS,
                             **pdl_args)
    merge[(B * H,)](acc, ml, out, out.stride(0), out.stride(1), H, pieces, D=D,
                    P_PAD=max(2, 1 << (pieces - 1).bit_length()), num_warps=4, **pdl_args)
    return out


@decode_attention.register_fake
def _(q, k, v, k_cache, v_cache, pos, window, cuda=False):
    return torch.empty_like(q)


# ---------------------------------------------------------------- paged KV

class NoFreeBlocks(RuntimeError):
    pass


class BlockAllocator:
    """Fixed-size blocks of KV memory: a free list, reference counts and the prefix cache.

    A block is referenced by every sequence whose block table holds it (parallel samples share their
    prompt's blocks, requests share cached prefixes). A full block can be published under the hash of
    its tokens and of everything before them; when its last reference goes it stays cached ("evictable")
    until the free list runs dry, then the least recently used one is reused. Block 0 is never handed
    out: padding rows write their keys there.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError(f"a paged KV pool needs at least 2 blocks, got {num_blocks}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free = deque(range(1, num_blocks))
        self.ref_count = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # prefix hash -> block
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, oldest first
        self.prefix_queries = self.prefix_hits = 0  # in blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self.free) + len(self.evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - 1 - self.num_free_blocks

    def allocate(self) -> int:
        if self.free:
            block = self.free.popleft()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            del self.cached[self.block_hash[block]]
            self.block_hash[block] = None
        else:
            raise NoFreeBlocks("no free KV blocks")
        self.ref_count[block] = 1
        return block

    def retain(self, block: int):
        if self.ref_count[block] == 0:
            self.evictable.pop(block)
        self.ref_count[block] += 1

    def release(self, block: int):
        self.ref_count[block] -= 1
        assert self.ref_count[block] >= 0, f"block {block} released more often than held"
        if self.ref_count[block] == 0:
            if self.block_hash[block] is not None:
                self.evictable[block] = None  # newest at the end
            else:
                self.free.append(block)

    def lookup(self, prefix_hash: int) -> int | None:
        """A cached block holding exactly these tokens after exactly this prefix (retained), or None."""
        self.prefix_queries += 1
        block = self.cached.get(prefix_hash)
        if block is not None:
            self.prefix_hits += 1
            self.retain(block)
        return block

    def publish(self, block: int, prefix_hash: int):
        if prefix_hash not in self.cached and self.block_hash[block] is None:
            self.cached[prefix_hash] = block
            self.block_hash[block] = prefix_hash

    def reset_prefix_cache(self):
        for block in self.evictable:
            self.free.append(block)
        for block in self.cached.values():
            self.block_hash[block] = None
        self.cached.clear()
        self.evictable.clear()


def chain_hash(parent: int | None, tokens) -> int:
    """The prefix-cache key of a full block: its tokens and (through the parent's key) all before them."""
    return hash((parent, tuple(tokens)))


class PagedLayerKV:
    """One layer's share of the pool: keys and values [1, Hkv, num_blocks * block_size, D]."""

    def __init__(self, k, v, cache: "PagedKVCache"):
        self.k, self.v, self.cache = k, v, cache

    def attend(self, q, k, v, input_pos, meta):
        # decode: q [B, H, 1, D], one row per sequence; prefill: q [1, H, N, D], the chunks packed
        B, H, T, D = q.shape
        slots = meta["slots"]  # [B * T] where each new token's key and value go
        # index the pool tensor itself (not a view of it): inductor then scatters in place instead of
        # copying the whole pool per layer
        self.k[:, :, slots] = k.transpose(0, 1).reshape(1, k.shape[1], B * T, D)  # [1, Hkv, B*T, D]
        self.v[:, :, slots] = v.transpose(0, 1).reshape(1, v.shape[1], B * T, D)
        opts = self.cache.kernel_options
        if meta["kind"] == "decode":
            return self.cache.flex(q, self.k, self.v, block_mask=meta["mask"], enable_gqa=True, kernel_options=opts)
        # prefill: lay the queries out so that every q block holds one sequence only -> [1, H, Npad, D]
        padded = q.index_select(2, meta["gather"])
        out = self.cache.flex_prefill(padded, self.k, self.v, block_mask=meta["mask"], enable_gqa=True,
                                      kernel_options=opts)
        return out.index_select(2, meta["scatter"])  # back to [1, H, N, D]


class PagedKVCache:
    """The paged pool: per layer one [1, Hkv, num_blocks * block_size, D] tensor for keys and one for
    values, shared by every sequence through its block table (logical block i of a sequence lives in
    physical block block_table[i]). Attention runs through FlexAttention: the BlockMask lists, for
    each query block, the physical blocks of its sequence, so the kernel reads only those; the mask_mod
    maps a physical slot back to a position in the query's sequence (-1: not its block) through a
    physical -> logical table per batch row (decode) or per query block (prefill), for the causal cut
    inside the last block. The mask_mod alone is exact, so unfused FlexAttention (no compiler) agrees.

    The scheduler owns the block tables; this class owns the memory, the allocator and the masks:
        table = []; cache.grow(table, n_tokens)             # allocate blocks to cover n tokens
        meta = cache.plan_decode(tables, positions, bucket) # or plan_prefill(chunks)
        logits = model(tokens, input_pos, cache)            # model.py calls prepare() and attend()
    """

    def __init__(self, args, num_blocks: int, block_size: int = 64, device=None, dtype=torch.float32,
                 max_batch: int = 256, max_tokens_per_step: int = 8192, q_block: int | None = None,
                 compile: bool = True):
        if args.sliding_window is not None:
            raise ValueError("the paged KV cache does not do sliding-window attention yet (use static batching)")
        device = torch.device(device or "cpu")
        self.args, self.device, self.dtype = args, device, dtype
        self.block_size, self.num_blocks, self.max_batch = block_size, num_blocks, max_batch
        self.q_block = q_block or (128 if device.type == "cuda" else 32)
        shape = (1, args.n_kv_heads, num_blocks * block_size, args.head_dim)
        self.layers = [PagedLayerKV(torch.zeros(shape, device=device, dtype=dtype),
                                    torch.zeros(shape, device=device, dtype=dtype), self)
                       for _ in range(args.n_layers)]
        self.allocator = BlockAllocator(num_blocks, block_size)
        # Persistent step buffers: the mask_mods close over them and CUDA graphs read them in place.
        # decode_p2l[b, block]: logical index of a physical block in row b's table (-1: not there)
        self.decode_p2l = torch.full((max_batch, num_blocks), -1, dtype=torch.int32, device=device)
        self.decode_qpos = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self.decode_slots = torch.zeros(max_batch, dtype=torch.long, device=device)
        idx = lambda *s: torch.zeros(*s, dtype=torch.int32, device=device)
        self._decode_blocks = (idx(max_batch, 1, 1), idx(max_batch, 1, 1, num_blocks),
                               idx(max_batch, 1, 1), idx(max_batch, 1, 1, num_blocks))
        self._decode_meta: dict[int, dict] = {}  # bucket -> meta (one BlockMask per batch shape)
        # the most padded prefill queries a step can have: every chunk rounds up to whole q blocks
        n_qblocks = math.ceil(max_tokens_per_step / self.q_block) + max_batch
        max_qblocks = 1 << (n_qblocks - 1).bit_length()
        self.prefill_qpos = torch.zeros(self.q_block * max_qblocks, dtype=torch.int32, device=device)
        self.prefill_p2l = torch.full((max_qblocks, num_blocks), -1, dtype=torch.int32, device=device)
        self.meta = None
        # Compiled FlexAttention is the fused kernel; uncompiled it is a slow reference that
        # materialises every score. Decode inside a compiled block inlines it either way.
        # Inductor's CPU kernel (torch 2.13, on an AVX2 machine) gets head_dim 16 with 8-token KV blocks
        # wrong (errors of order 1; other sizes agree with the reference to 1e-6): such toy shapes take
        # the reference.
        compile = compile and (device.type == "cuda" or args.head_dim >= 32 or block_size >= 16)
        self.flex = torch.compile(flex_attention, dynamic=False) if compile else flex_attention
        # Decode: CPU wants the blocks before the last one as "full" (no mask_mod there); the GPU's flex
        # decoding kernel splits the work over the whole pool's length when any full block exists
        # (torch 2.11-2.13), so there every block goes in as partial and the exact mask_mod runs.
        self.decode_full_blocks = device.type != "cuda"
        # The GPU kernels' key tile must not straddle two KV blocks (the block mask's granularity)
        self.kernel_options = {"BLOCK_N": min(64, block_size)} if device.type == "cuda" else None
        # Prefill sizes vary step to step: on CUDA one kernel with a symbolic query length; inductor's
        # CPU template cannot do that with this mask (a C++ compile error in torch 2.13), so on CPU each
        # power-of-two size compiles once.
        dynamic = device.type == "cuda"
        self.flex_prefill = torch.compile(flex_attention, dynamic=dynamic) if compile else flex_attention
        # Each decode bucket and prefill size is one more compiled shape of that one function; past
        # dynamo's default limit of 8 it would silently fall back to the unfused kernel.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        # The mask_mods close over the buffers themselves, not over self: compiled code then takes them
        # as inputs and a second cache reuses the compiled kernels instead of recompiling.
        page, qb = block_size, self.q_block
        decode_p2l, decode_qpos, prefill_p2l, prefill_qpos = self.decode_p2l, self.decode_qpos, self.prefill_p2l, self.prefill_qpos

        def decode_mask(b, h, q_idx, kv_idx):  # the kernel needs it on the last (partial) block only
            logical = decode_p2l[b, kv_idx // page]
            return (logical >= 0) & (logical * page + kv_idx % page <= decode_qpos[b])

        def prefill_mask(b, h, q_idx, kv_idx):
            logical = prefill_p2l[q_idx // qb, kv_idx // page]
            return (logical >= 0) & (logical * page + kv_idx % page <= prefill_qpos[q_idx])

        self._decode_mask_mod, self._prefill_mask_mod = decode_mask, prefill_mask

    # ------------------------------------------------------------ sizing

    @staticmethod
    def bytes_per_block(args, block_size: int, dtype) -> int:
        return 2 * args.n_layers * args.n_kv_heads * args.head_dim * block_size * dtype.itemsize

    @staticmethod
    def blocks_for_memory(args, block_size, dtype, device, gpu_memory_utilization=None, kv_tokens=None) -> int:
        """How many blocks: from a token budget, or from the GPU memory left under the utilisation cap
        (after the weights and what is allocated now; 5% of the GPU kept for activations)."""
        if kv_tokens is not None:
            return max(2, math.ceil(kv_tokens / block_size) + 1)  # +1: block 0 is scratch
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError("size the KV pool with kv_tokens on CPU (gpu_memory_utilization needs a GPU)")
        total = torch.cuda.get_device_properties(device).total_memory
        free_now, _ = torch.cuda.mem_get_info(device)
        used = total - free_now
        budget = total * (gpu_memory_utilization or 0.9) - used - 0.05 * total
        n = int(budget // PagedKVCache.bytes_per_block(args, block_size, dtype))
        if n < 2:
            raise ValueError(f"no GPU memory left for the KV cache at --gpu-memory-utilization "
                             f"{gpu_memory_utilization} ({used / 2**30:.1f} GiB in use of {total / 2**30:.1f})")
        return n

    @property
    def capacity_tokens(self) -> int:
        return (self.num_blocks - 1) * self.block_size

    @property
    def nbytes(self) -> int:
        return sum(layer.k.nbytes + layer.v.nbytes for layer in self.layers)

    # ------------------------------------------------------------ block tables

    def blocks_needed(self, table: list[int], n_tokens: int) -> int:
        return max(0, math.ceil(n_tokens / self.block_size) - len(table))

    def grow(self, table: list[int], n_tokens: int):
        """Allocate blocks at the end of table until it covers n_tokens (NoFreeBlocks if it cannot:
        then it allocates nothing)."""
        need = self.blocks_needed(table, n_tokens)
        if need > self.allocator.num_free_blocks:
            raise NoFreeBlocks(f"need {need} KV blocks, {self.allocator.num_free_blocks} free")
        for _ in range(need):
            table.append(self.allocator.allocate())

    def blocks_to_write(self, table: list[int], start: int, n: int) -> int:
        """Blocks that writing n tokens from position start takes: new ones at the end, plus a copy of
        the block holding start when it is shared."""
        i = start // self.block_size
        shared = i < len(table) and self.allocator.ref_count[table[i]] > 1
        return self.blocks_needed(table, start + n) + shared

    def reserve(self, table: list[int], start: int, n: int):
        """Make positions start..start+n-1 writable: grow the table, copy a shared block (copy-on-write).
        NoFreeBlocks, with nothing allocated, when the free blocks do not suffice."""
        need = self.blocks_to_write(table, start, n)
        if need > self.allocator.num_free_blocks:
            raise NoFreeBlocks(f"need {need} KV blocks, {self.allocator.num_free_blocks} free")
        self.grow(table, start + n)
        self.make_writable(table, start)

    def make_writable(self, table: list[int], pos: int):
        """Copy-on-write: before writing position pos, give the sequence its own copy of a shared block."""
        i = pos // self.block_size
        old = table[i]
        if self.allocator.ref_count[old] == 1:
            return
        new = self.allocator.allocate()
        a, b, page = old * self.block_size, new * self.block_size, self.block_size
        for layer in self.layers:
            layer.k[:, :, b:b + page] = layer.k[:, :, a:a + page]
            layer.v[:, :, b:b + page] = layer.v[:, :, a:a + page]
        self.allocator.release(old)
        table[i] = new

    def share(self, table: list[int]) -> list[int]:
        """A second block table over the same blocks (parallel samples after their common prompt)."""
        for block in table:
            self.allocator.retain(block)
        return list(table)

    def free(self, table: list[int]):
        for block in table:
            self.allocator.release(block)
        table.clear()

    def match_prefix(self, tokens: list[int], table: list[int], hashes: list[int]) -> int:
        """Fill an empty table with cached blocks holding a prefix of tokens; returns the tokens covered.
        At least one token is always left to compute (its logits give the next token)."""
        page = self.block_size
        for i in range((len(tokens) - 1) // page):
            h = chain_hash(hashes[-1] if hashes else None, tokens[i * page:(i + 1) * page])
            block = self.allocator.lookup(h)
            if block is None:
                break
            table.append(block)
            hashes.append(h)
        return len(table) * page

    def publish_full_blocks(self, tokens: list[int], n_computed: int, table: list[int], hashes: list[int]):
        """Put every block that is now full of computed tokens into the prefix cache."""
        page = self.block_size
        while len(hashes) < n_computed // page:
            i = len(hashes)
            h = chain_hash(hashes[-1] if hashes else None, tokens[i * page:(i + 1) * page])
            self.allocator.publish(table[i], h)
            hashes.append(h)

    # ------------------------------------------------------------ steps

    def plan_decode(self, tables: list[list[int]], positions: list[int], bucket: int) -> dict:
        """One new token per sequence at positions[b]; rows past len(tables) up to bucket are padding
        (they write into scratch block 0 and attend to nothing). The returned meta lives in persistent
        buffers, so a CUDA graph captured with it stays valid."""
        n, page = len(tables), self.block_size
        if bucket > self.max_batch:
            raise ValueError(f"decode batch {bucket} exceeds max_batch {self.max_batch}")
        kv_num, kv_idx, full_num, full_idx = (t[:bucket] for t in self._decode_blocks)
        # host side, vectorised (this runs every step for up to max_batch rows): every row's blocks
        # up to the one holding its position, flattened
        counts = [p // page + 1 for p in positions]
        flat = [block for table, c in zip(tables, counts) for block in table[:c]]
        total, width = len(flat), max(counts, default=1)
        rows = torch.repeat_interleave(torch.arange(n), torch.tensor(counts, dtype=torch.long)) if n else torch.zeros(0, dtype=torch.long)
        starts = torch.zeros(n, dtype=torch.long)
        if n > 1:
            starts[1:] = torch.tensor(counts[:-1]).cumsum(0)
        cols = torch.arange(total) - starts[rows]  # logical block index of each flattened entry
        blocks = torch.tensor(flat, dtype=torch.int32)
        h_idx = torch.zeros(bucket, width, dtype=torch.int32)
        h_idx[rows, cols] = blocks
        h_full = torch.zeros(bucket, dtype=torch.int32)
        h_num = torch.zeros(bucket, dtype=torch.int32)
        last = torch.tensor(counts, dtype=torch.int32) - 1
        split_full = self.decode_full_blocks
        if split_full:  # the last block partial, the ones before it full
            h_num[:n], h_full[:n] = 1, last
        else:
            h_num[:n] = last + 1
        h_qpos = torch.zeros(bucket, dtype=torch.int32)
        h_qpos[:n] = torch.tensor(positions, dtype=torch.int32)
        h_slots = torch.zeros(bucket, dtype=torch.long)
        if n:
            h_slots[:n] = h_idx[torch.arange(n), last.long()].long() * page + h_qpos[:n].long() % page
        p2l = self.decode_p2l[:bucket]
        p2l.fill_(-1)
        dev = self.device
        p2l.index_put_((rows.to(dev, non_blocking=True), blocks.long().to(dev, non_blocking=True)),
                       cols.int().to(dev, non_blocking=True))
        kv_num.view(bucket).copy_(h_num, non_blocking=True)
        if split_full:
            full_num.view(bucket).copy_(h_full, non_blocking=True)
            full_idx[:, 0, 0, :width].copy_(h_idx, non_blocking=True)
            # the partial block alone in kv_idx: each row's block number h_full
            kv_idx[:, 0, 0, :1].copy_(h_idx.gather(1, h_full.long()[:, None]), non_blocking=True)
        else:
            kv_idx[:, 0, 0, :width].copy_(h_idx, non_blocking=True)
        self.decode_qpos[:bucket].copy_(h_qpos, non_blocking=True)
        self.decode_slots[:bucket].copy_(h_slots, non_blocking=True)
        meta = self._decode_meta.get(bucket)
        if meta is None:
            full = (full_num, full_idx) if split_full else (None, None)
            mask = BlockMask.from_kv_blocks(kv_num, kv_idx, *full, BLOCK_SIZE=(self.q_block, page),
                                            mask_mod=self._decode_mask_mod, seq_lengths=(1, self.num_blocks * page),
                                            compute_q_blocks=False)
            meta = self._decode_meta[bucket] = {"kind": "decode", "slots": self.decode_slots[:bucket], "mask": mask}
        self.meta = meta
        return meta

    def plan_prefill(self, chunks: list[tuple[list[int], int, int]]) -> dict:
        """chunks: (block_table, start, length) per sequence, its tokens start..start+length-1 packed
        one sequence after another. Each sequence's queries are padded to whole q blocks (so a q block
        never mixes sequences), and the total to a power of two (few shapes to compile)."""
        page, qb = self.block_size, self.q_block
        n_tokens = sum(length for _, _, length in chunks)
        n_qblocks = sum(math.ceil(length / qb) for _, _, length in chunks)
        n_pad = qb * max(1, 1 << (n_qblocks - 1).bit_length())
        nqb = n_pad // qb
        gather = torch.zeros(n_pad, dtype=torch.long)
        scatter = torch.empty(n_tokens, dtype=torch.long)
        qpos = torch.full((n_pad,), -1, dtype=torch.int32)
        slots = torch.empty(n_tokens, dtype=torch.long)
        kv_num = torch.zeros(1, 1, nqb, dtype=torch.int32)
        full_num = torch.zeros(1, 1, nqb, dtype=torch.int32)
        width = max(math.ceil((start + length) / page) for _, start, length in chunks)
        kv_idx = torch.zeros(1, 1, nqb, width, dtype=torch.int32)
        full_idx = torch.zeros(1, 1, nqb, width, dtype=torch.int32)
        p2l_rows, p2l_blocks, p2l_logical = [], [], []
        src, dst = 0, 0  # packed token index, padded query index
        for table, start, length in chunks:
            positions = torch.arange(start, start + length)
            gather[dst:dst + length] = torch.arange(src, src + length)
            scatter[src:src + length] = torch.arange(dst, dst + length)
            qpos[dst:dst + length] = positions.int()
            blocks = torch.tensor(table, dtype=torch.int32)
            slots[src:src + length] = blocks[positions // page].long() * page + positions % page
            for j in range(math.ceil(length / qb)):
                lo = start + j * qb  # first and last position of this q block
                hi = min(lo + qb, start + length) - 1
                n_full, last = (lo + 1) // page, hi // page  # blocks before n_full lie wholly in the past
                q = dst // qb + j
                full_num[0, 0, q] = n_full
                full_idx[0, 0, q, :n_full] = blocks[:n_full]
                kv_num[0, 0, q] = last + 1 - n_full
                kv_idx[0, 0, q, :last + 1 - n_full] = blocks[n_full:last + 1]
                p2l_rows += [q] * (last + 1)
                p2l_blocks += table[:last + 1]
                p2l_logical += range(last + 1)
            src += length
            dst += qb * math.ceil(length / qb)
        dev = self.device
        if n_pad > self.prefill_qpos.numel():
            raise ValueError(f"{n_tokens} prefill tokens in {len(chunks)} chunks exceed max_tokens_per_step")
        self.prefill_qpos[:n_pad].copy_(qpos)
        p2l = self.prefill_p2l[:nqb]
        p2l.fill_(-1)
        p2l.index_put_(self._dev_long(p2l_rows, p2l_blocks), self._dev_int(p2l_logical))
        # kv_idx must span the whole pool in its last dimension
        pad = lambda t: F.pad(t, (0, self.num_blocks - width)).to(dev, non_blocking=True)
        mask = BlockMask.from_kv_blocks(kv_num.to(dev), pad(kv_idx), full_num.to(dev), pad(full_idx),
                                        BLOCK_SIZE=(qb, page), mask_mod=self._prefill_mask_mod,
                                        seq_lengths=(n_pad, self.num_blocks * page), compute_q_blocks=False)
        self.meta = {"kind": "prefill", "slots": slots.to(dev), "gather": gather.to(dev),
                     "scatter": scatter.to(dev), "mask": mask}
        return self.meta

    def _dev_long(self, *lists):
        return tuple(torch.tensor(x, dtype=torch.long).to(self.device, non_blocking=True) for x in lists)

    def _dev_int(self, values):
        return torch.tensor(values, dtype=torch.int32).to(self.device, non_blocking=True)

    def prepare(self, input_pos, fresh: bool = False):
        return self.meta  # planned by plan_decode / plan_prefill
