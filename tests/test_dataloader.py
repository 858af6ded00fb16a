"""nanochat.dataloader (lesson 03) over a small synthetic shard set: every row starts at a document start, DDP ranks
share the data without losing or duplicating a token, and a loader rebuilt from a saved state continues exactly."""
import collections, io, pickle, random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.dataloader import tokenizing_distributed_data_loader as loader
from nanochat.dataset import data_dir, shard_filename

B, T = 4, 16
BOS, ID0 = 0, 1000  # document i's second token is ID0 + i (its id); content tokens are 1..999, never BOS
SHARD_DOCS = [50, 70, 37]  # three train shards (the fourth, val, has 30); row groups of 8 -> 7 + 9 + 5 = 21 train row groups
ROW_GROUP = 8


class IntTokenizer:
    "Test stand-in for the BPE tokenizer: a text of space-separated integers encodes to those integers."
    def get_bos_token_id(self): return BOS
    def get_vocab_size(self): return 10_000
    def encode(self, texts, prepend=None, num_threads=8):
        assert prepend == BOS and isinstance(texts, list)
        return [[prepend] + [int(w) for w in t.split()] for t in texts]


@pytest.fixture
def shards(tmp_path, monkeypatch):
    """Write 3 train shards + 1 val shard; return {split: [row group -> list of token lists]} in global row-group order.
    Lengths range from 2 tokens to about 3 rows, so some documents always fit, and some never do and must be cropped."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("NANOCHAT_NUM_SHARDS", "4")
    rng, doc_id, out = random.Random(0), 0, {"train": [], "val": []}
    for shard, n in enumerate(SHARD_DOCS + [30]):
        docs = []
        for _ in range(n):
            docs.append([ID0 + doc_id] + [rng.randint(1, 999) for _ in range(rng.choice([rng.randint(0, 8), rng.randint(0, 3 * T)]))])
            doc_id += 1
        path = data_dir() / shard_filename(shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"text": [" ".join(map(str, d)) for d in docs]}), path, row_group_size=ROW_GROUP)
        split = "val" if shard == 3 else "train"
        out[split] += [[[BOS] + d for d in docs[i:i + ROW_GROUP]] for i in range(0, n, ROW_GROUP)]
    return out


def take(it, n): return [next(it) for _ in range(n)]


def segments(row):
    "Split a row at its BOS tokens: the documents (or document prefixes) it was packed from."
    starts = [i for i, t in enumerate(row) if t == BOS]
    assert starts and starts[0] == 0, f"row does not start with BOS: {row[:8]}"
    return [row[a:b] for a, b in zip(starts, starts[1:] + [len(row)])]


def buffered(state):
    assert all(d.dtype == torch.int32 and d.ndim == 1 for d in state["docs"])
    return [d.tolist() for d in state["docs"]]


def read_so_far(row_groups, rank, world_size, state):
    "Documents this rank has read when it is at `state`: all its row groups `state['epoch']` times, then those before `state['rg']`."
    mine = range(rank, len(row_groups), world_size)
    return [d for _ in range(state["epoch"]) for g in mine for d in row_groups[g]] + [d for g in mine if g < state["rg"] for d in row_groups[g]]


def check_batches(batches, row_groups, rank, world_size, state0=None):
    """Account for every document this rank has read, batch by batch. A document leaves the buffer exactly once and then
    appears as exactly one segment of one row: whole, or (only as a row's last segment) a proper prefix of it, whose tail
    is dropped. Returns the documents emitted in full and the cropped ones as {doc id: count}, and the number of crops
    that kept only the BOS (those can't be told apart, but must match documents that left the buffer one for one)."""
    whole, cropped, n_bos_only = collections.Counter(), collections.Counter(), 0
    before = collections.Counter(map(tuple, buffered(state0))) if state0 else collections.Counter()
    read_before = collections.Counter(map(tuple, read_so_far(row_groups, rank, world_size, state0))) if state0 else collections.Counter()
    for inputs, targets, state in batches:
        assert inputs.dtype == targets.dtype == torch.int64 and inputs.shape == targets.shape == (B, T)
        assert torch.equal(inputs[:, 1:], targets[:, :-1])  # targets are the inputs shifted by one
        rows = torch.cat([inputs, targets[:, -1:]], 1).tolist()
        read = collections.Counter(map(tuple, read_so_far(row_groups, rank, world_size, state)))
        after = collections.Counter(map(tuple, buffered(state)))
        left = before + (read - read_before) - after  # the documents that went into this batch's rows
        assert not (after - before - (read - read_before)), "the buffer holds a document that was never read"
        bos_only = 0
        for row in rows:
            segs = segments(row)
            for j, seg in enumerate(segs):
                if len(seg) == 1:  # a crop that kept only the BOS: a prefix of any document that left
                    assert j == len(segs) - 1; bos_only += 1; continue
                doc = next((d for d in left if d[1] == seg[1]), None)
                assert doc is not None and left[doc] > 0, f"segment of document {seg[1] - ID0} does not come from a document that left the buffer"
                assert list(doc[:len(seg)]) == seg, "a segment is not a prefix of its document"
                if len(seg) < len(doc):
                    assert j == len(segs) - 1, "only a row's last segment may be cropped"
                    cropped[seg[1]] += 1
                else: whole[seg[1]] += 1
                left[doc] -= 1
        assert sum((+left).values()) == bos_only, "documents left the buffer without being emitted (or tokens appeared twice)"
        before, read_before, n_bos_only = after, read, n_bos_only + bos_only
    return whole, cropped, n_bos_only


@pytest.mark.parametrize("buffer_docs", [1, 12])
def test_ranks_share_an_epoch_exactly(shards, buffer_docs):
    "world_size=2: rank 0 reads the even row groups, rank 1 the odd ones; in epoch 0 every document is emitted by one rank."
    rgs = shards["train"]
    assert len(rgs) == 21  # odd: rank 0 gets 11 row groups, rank 1 gets 10
    emitted, still, bos_only = {}, {}, {}
    for rank in (0, 1):
        it = loader(B, T, "train", tokenizer=IntTokenizer(), rank=rank, world_size=2, buffer_docs=buffer_docs)
        batches = []
        while not batches or batches[-1][2]["epoch"] == 0: batches += take(it, 1)
        state = batches[-1][2]  # the first state of epoch 1: every epoch-0 row group of this rank has been read
        assert state["rg"] == rank + 2 * (state["rg"] // 2) and state["rank"] == rank
        whole, cropped, bos_only[rank] = check_batches(batches, rgs, rank, 2)
        assert cropped and whole, "the data should exercise both whole and cropped documents"
        emitted[rank] = whole + cropped
        still[rank] = collections.Counter(d[1] for d in buffered(state))
    ids = {r: {d[1] for g in range(r, len(rgs), 2) for d in rgs[g]} for r in (0, 1)}
    assert ids[0] & ids[1] == set() and len(ids[0] | ids[1]) == sum(SHARD_DOCS)  # the ranks split the files between them
    for r in (0, 1):
        assert set(emitted[r]) | set(still[r]) <= ids[r], "a rank emitted a document of the other rank's row groups"
        # every document of this rank's epoch 0 was emitted, is still buffered, or was a BOS-only crop
        assert len(ids[r] - set(emitted[r]) - set(still[r])) <= bos_only[r]
    assert set(emitted[0]).isdisjoint(emitted[1])


def test_resume_is_exact(shards):
    "State after k batches -> a fresh loader -> the next m batches equal the uninterrupted loader's, across epochs."
    tok = IntTokenizer()
    ref = take(loader(B, T, "train", tokenizer=tok, rank=1, world_size=2, buffer_docs=5), 60)
    epochs = [s["epoch"] for _, _, s in ref]
    assert epochs[-1] >= 1, "the run should cross an epoch boundary"
    boundary = epochs.index(1)
    for k in sorted({1, 7, boundary - 2, boundary - 1, boundary, 40}):
        saved = io.BytesIO()
        torch.save(ref[k - 1][2], saved)  # it must survive a checkpoint (weights_only load, the torch default)
        state = torch.load(io.BytesIO(saved.getvalue()), weights_only=True)
        state = pickle.loads(pickle.dumps(state))
        resumed = take(loader(B, T, "train", tokenizer=tok, rank=1, world_size=2, buffer_docs=5, state=state), 60 - k)
        for (x, y, s), (x2, y2, s2) in zip(ref[k:], resumed):
            assert torch.equal(x, x2) and torch.equal(y, y2)
            assert s.keys() == s2.keys() and all(s[n] == s2[n] for n in s if n != "docs")
            assert len(s["docs"]) == len(s2["docs"]) and all(torch.equal(a, b) for a, b in zip(s["docs"], s2["docs"]))


def test_val_loops_and_rows_start_at_documents(shards):
    "The val split loops over its one shard too, so every rank can always supply a fixed number of eval batches."
    batches = take(loader(B, T, "val", tokenizer=IntTokenizer(), rank=0, world_size=1, buffer_docs=4), 30)
    assert batches[-1][2]["epoch"] >= 1
    check_batches(batches, shards["val"], 0, 1)


def test_bad_input(shards):
    tok = IntTokenizer()
    with pytest.raises(ValueError, match="split"): loader(B, T, "test", tokenizer=tok)
    with pytest.raises(ValueError, match="rank"): loader(B, T, "train", tokenizer=tok, rank=2, world_size=2)
    with pytest.raises(ValueError, match="row groups"): next(loader(B, T, "val", tokenizer=tok, rank=7, world_size=8))
    _, _, state = next(loader(B, T, "train", tokenizer=tok, rank=0, world_size=2))
    with pytest.raises(ValueError, match="rank=0"): loader(B, T, "train", tokenizer=tok, rank=1, world_size=2, state=state)
    with pytest.raises(ValueError, match="missing"): loader(B, T, "train", tokenizer=tok, rank=0, world_size=2, state={"epoch": 0})
