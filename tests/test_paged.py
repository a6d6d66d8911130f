"""The paged KV pool on its own: FlexAttention over block tables equals plain causal SDPA, copy-on-write,
the prefix cache, and the allocator's bookkeeping under random arrivals, finishes and cancellations."""
import random

import pytest
import torch
from torch.nn.attention.flex_attention import flex_attention

from kv import BlockAllocator, NoFreeBlocks, PagedKVCache
from model import ModelArgs
from sampling import SamplingParams
from scheduler import Engine

ARGS = ModelArgs(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=256)


@pytest.mark.parametrize("page", [8, 16])  # on CPU head_dim 16: 8 runs the unfused reference, 16 the compiled kernel
@torch.inference_mode()
def test_paged_prefill_chunks_and_decode_equal_contiguous_sdpa(tiny_model, page):
    model = tiny_model(ARGS)
    cache = PagedKVCache(ARGS, num_blocks=40, block_size=page, max_batch=4, max_tokens_per_step=96, q_block=16)
    assert (cache.flex_prefill is flex_attention) == (page == 8 and cache.device.type == "cpu")
    torch.manual_seed(1)
    seqs = [torch.randint(0, ARGS.vocab_size, (n,)).tolist() for n in (37, 21, 50)]
    # the plain path: each sequence alone, causal SDPA over all its tokens, no cache
    want = [model(torch.tensor([s]))[0] for s in seqs]  # [len, vocab]
    # block tables out of order in the pool, so physical != logical everywhere
    rng = random.Random(0)
    order = list(range(1, 40))
    rng.shuffle(order)
    tables = [[], [], []]
    for t, s in zip(tables, seqs):
        for _ in range(-(-len(s) // page)):
            t.append(order.pop())
    done = [0, 0, 0]

    def prefill(pieces):  # [(seq index, n tokens)] packed into one [1, N] forward
        tokens, pos, ends = [], [], []
        for i, n in pieces:
            tokens += seqs[i][done[i]:done[i] + n]
            pos += range(done[i], done[i] + n)
            ends.append(len(tokens) - 1)
        cache.plan_prefill([(tables[i], done[i], n) for i, n in pieces])
        out = model(torch.tensor([tokens]), torch.tensor([pos]), cache, logits_at=torch.tensor([ends]))[0]
        for k, (i, n) in enumerate(pieces):
            done[i] += n
            torch.testing.assert_close(out[k], want[i][done[i] - 1], atol=1e-4, rtol=1e-4)

    prefill([(0, 20), (1, 5)])  # chunks starting at 0, mid-block ends
    prefill([(0, 10), (1, 9), (2, 30)])  # continuing chunks next to a fresh one
    prefill([(2, 13)])
    for _ in range(6):  # decode steps, one token per sequence, padded to a bucket of 4
        live = [i for i in range(3) if done[i] < len(seqs[i])]
        cache.plan_decode([tables[i] for i in live], [done[i] for i in live], bucket=4)
        tokens = torch.zeros(4, 1, dtype=torch.long)
        pos = torch.zeros(4, 1, dtype=torch.long)
        for b, i in enumerate(live):
            tokens[b, 0], pos[b, 0] = seqs[i][done[i]], done[i]
        out = model(tokens, pos, cache)[:, 0]
        for b, i in enumerate(live):
            torch.testing.assert_close(out[b], want[i][done[i]], atol=1e-4, rtol=1e-4)
            done[i] += 1


def test_copy_on_write_keeps_the_other_sequences_view():
    cache = PagedKVCache(ARGS, num_blocks=8, block_size=4, max_batch=2, max_tokens_per_step=16, q_block=16)
    a = []
    cache.grow(a, 6)  # two blocks, the second half full
    for layer in cache.layers:
        layer.k.normal_()
    b = cache.share(a)
    assert cache.allocator.ref_count[a[1]] == 2
    before = cache.layers[0].k[0, :, a[1] * 4:a[1] * 4 + 4].clone()
    cache.make_writable(b, 6)  # b writes position 6 -> gets its own copy of block 1
    assert b[1] != a[1] and b[0] == a[0]
    assert cache.allocator.ref_count[a[1]] == 1 and cache.allocator.ref_count[b[1]] == 1
    torch.testing.assert_close(cache.layers[0].k[0, :, b[1] * 4:b[1] * 4 + 4], before)
    cache.free(a)
    cache.free(b)
    assert cache.allocator.num_free_blocks == 7


def test_prefix_cache_hits_and_lru_eviction():
    cache = PagedKVCache(ARGS, num_blocks=5, block_size=4, max_batch=2, max_tokens_per_step=16, q_block=16)
    tokens = list(range(13))
    table, hashes = [], []
    cache.grow(table, 13)  # 4 blocks, all of the pool
    cache.publish_full_blocks(tokens, 13, table, hashes)
    assert len(hashes) == 3  # the partial fourth block is not cached
    chain = list(table[:3])
    cache.free(table)
    assert cache.allocator.num_free_blocks == 4 and len(cache.allocator.evictable) == 3
    # the same prefix comes back: three blocks reused, at least one token left to compute
    t2, h2 = [], []
    assert cache.match_prefix(tokens, t2, h2) == 12
    cache.free(t2)
    t2 = []
    assert cache.match_prefix(tokens[:12], t2, []) == 8  # 12 tokens: the last block must be computed
    cache.free(t2)
    # a different token in block 1 breaks the chain from there on
    other = tokens[:5] + [99] + tokens[6:]
    t3 = []
    assert cache.match_prefix(other, t3, []) == 4
    cache.free(t3)
    # allocation takes free blocks first, then evicts the least recently released cached block
    lru = list(cache.allocator.evictable)
    fresh = [cache.allocator.allocate() for _ in range(2)]  # one free block, then the oldest cached one
    assert fresh[1] == lru[0] and list(cache.allocator.evictable) == lru[1:]
    t4 = []  # the chain now breaks at the evicted block
    assert cache.match_prefix(tokens, t4, []) == 4 * chain.index(lru[0])
    cache.free(t4)
    with pytest.raises(NoFreeBlocks):
        cache.grow([], 3 * 4 + 1)
    assert cache.allocator.num_free_blocks == 2  # grow allocates nothing when it cannot cover all


def test_allocator_rejects_double_release():
    alloc = BlockAllocator(4, 16)
    b = alloc.allocate()
    alloc.release(b)
    with pytest.raises(AssertionError):
        alloc.release(b)


def check_invariants(sched):
    cache, alloc = sched.cache, sched.cache.allocator
    held = [0] * alloc.num_blocks
    for seq in sched.running + list(sched.waiting):
        assert len(set(seq.block_table)) == len(seq.block_table), "a block twice in one table"
        for block in seq.block_table:
            held[block] += 1
    for seq in sched.waiting:
        assert not seq.block_table, "a waiting sequence holds blocks"
    for seq in sched.running:  # no waste: at most one partial block per sequence
        assert len(seq.block_table) == -(-seq.num_computed // cache.block_size)
    for block in range(1, alloc.num_blocks):
        assert alloc.ref_count[block] == held[block], f"block {block}: ref {alloc.ref_count[block]}, held {held[block]}"
    free, evictable = set(alloc.free), set(alloc.evictable)
    used = {b for b in range(1, alloc.num_blocks) if alloc.ref_count[b] > 0}
    assert not (free & evictable) and not (free & used) and not (evictable & used)
    assert free | evictable | used == set(range(1, alloc.num_blocks))
    assert all(alloc.block_hash[b] is not None for b in evictable)
    assert all(alloc.cached[alloc.block_hash[b]] == b for b in evictable)


def test_scheduler_random_arrivals_finishes_and_cancels_keep_the_allocator_consistent(tiny_model):
    model = tiny_model(ARGS)
    engine = Engine(model, None, torch.device("cpu"), torch.float32, max_seq_len=128, kv_tokens=24 * 8,
                    block_size=8, max_batch=8, max_tokens_per_step=48)
    alone = Engine(model, None, torch.device("cpu"), torch.float32, max_seq_len=128)
    sched = engine.scheduler
    rng = random.Random(0)
    shared = [rng.randrange(ARGS.vocab_size) for _ in range(20)]
    live, finished = [], []
    for it in range(60):
        if rng.random() < 0.4 and it < 45:
            n_prompt = rng.randint(1, 40)
            prompt = (shared[:rng.randint(0, 20)] + [rng.randrange(ARGS.vocab_size) for _ in range(n_prompt)])[:60] or [1]
            params = SamplingParams(max_new_tokens=rng.randint(1, 30), ignore_eos=True)
            live.append(engine.submit(prompt, params, n=rng.choice([1, 1, 2, 3])))
        if live and rng.random() < 0.08:
            victim = live.pop(rng.randrange(len(live)))
            engine.cancel(victim)
        engine.step()
        check_invariants(sched)
        finished += [r for r in live if r.finished]
        live = [r for r in live if not r.finished]
    while sched.has_work():
        engine.step()
        check_invariants(sched)
    finished += live
    assert sched.num_preemptions > 0, "the pool is small enough that preemption must happen"
    alloc = sched.cache.allocator
    assert alloc.num_free_blocks == alloc.num_blocks - 1 and not any(alloc.ref_count)
    # every request that was not cancelled got exactly what it gets alone (greedy: all n samples equal)
    checked = 0
    for r in finished:
        if any(s.finish_reason == "cancelled" for s in r.seqs):
            continue
        [want] = alone.generate([r.prompt_ids], r.params)
        assert [s.token_ids for s in r.seqs] == [want.token_ids] * r.n
        checked += 1
    assert checked >= 10
