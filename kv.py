"""KV memory and the attention kernels over it.

StaticKVCache: one preallocated [layers, batch, kv_heads, max_seq_len, head_dim] buffer for keys and
one for values. Every row of the batch has its own positions, so prompts of different lengths share
a batch without padding changing any row's result: row b writes its keys at its own positions and a
query at position p sees exactly the keys at positions <= p (and > p - window with a sliding window).
Slots a row has not written yet (or that hold a shorter prompt's padding) sit at positions > p, so
the causal mask hides them until the row overwrites them with its own tokens.

The model calls, once per forward, meta = cache.prepare(input_pos), then per layer
cache.attend(layer_idx, q, k, v, input_pos, meta).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class StaticKVCache(nn.Module):
    def __init__(self, args, batch_size: int, max_seq_len: int, device=None, dtype=torch.float32):
        super().__init__()
        shape = (args.n_layers, batch_size, args.n_kv_heads, max_seq_len, args.head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self.window = args.sliding_window
        self.windowed_layers = [args.uses_window(i) for i in range(args.n_layers)]
        # Attend over the first kv_len slots only. Eager decoding sets it to the longest row rounded
        # up (less to read); compiled decoding leaves it at max_seq_len so shapes never change.
        self.kv_len = max_seq_len

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def prepare(self, input_pos):
        # input_pos [B, T] -> boolean masks [B, 1, T, kv_len]: full causal, and sliding-window causal
        k_pos = torch.arange(self.kv_len, device=input_pos.device)
        q_pos = input_pos[:, None, :, None]
        causal = k_pos <= q_pos
        windowed = causal & (k_pos > q_pos - self.window) if self.window is not None else None
        return causal, windowed

    def attend(self, layer_idx, q, k, v, input_pos, meta):
        # q [B, H, T, D]; k, v [B, Hkv, T, D] written at input_pos [B, T] of each row
        B = q.shape[0]
        rows = torch.arange(B, device=q.device)[:, None]  # [B, 1] broadcasts against input_pos [B, T]
        k_cache, v_cache = self.k[layer_idx], self.v[layer_idx]  # [B, Hkv, S, D]
        k_cache[rows, :, input_pos] = k.transpose(1, 2)  # indexed view is [B, T, Hkv, D]
        v_cache[rows, :, input_pos] = v.transpose(1, 2)
        causal, windowed = meta
        mask = windowed if self.windowed_layers[layer_idx] else causal
        keys, values = k_cache[:B, :, : self.kv_len], v_cache[:B, :, : self.kv_len]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)

    def reset(self):
        self.k.zero_()
        self.v.zero_()
