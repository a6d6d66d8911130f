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
"""
import math

import torch
import torch.nn.functional as F


class LayerKV:
    """One layer's keys and values [B, Hkv, S, D], and whether it uses the sliding window."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, windowed: bool):
        self.k, self.v, self.windowed = k, v, windowed

    def attend(self, q, k, v, input_pos, meta):
        # q [B, H, T, D]; k, v [B, Hkv, T, D] are written at input_pos [B, T] of each row
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
    def __init__(self, args, batch_size: int, max_seq_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, args.n_kv_heads, max_seq_len, args.head_dim)
        self.layers = [LayerKV(torch.zeros(shape, device=device, dtype=dtype),
                               torch.zeros(shape, device=device, dtype=dtype), args.uses_window(i))
                       for i in range(args.n_layers)]
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self.window = args.sliding_window
        # Attend over the first kv_len slots only. Eager decoding sets it to the longest row rounded
        # up (less to read); compiled decoding leaves it at max_seq_len so shapes never change.
        self.kv_len = max_seq_len

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
        # input_pos [B, T] -> boolean masks [B, 1, T, kv_len]: causal, and causal within the window
        k_pos = torch.arange(self.kv_len, device=input_pos.device)
        q_pos = input_pos[:, None, :, None]
        causal = k_pos <= q_pos
        windowed = causal & (k_pos > q_pos - self.window) if self.window is not None else None
        return causal, windowed

    def reset(self):
        for layer in self.layers:
            layer.k.zero_()
            layer.v.zero_()
