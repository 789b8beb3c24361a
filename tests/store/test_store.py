"""The gradient store: exact round trips (against torch's own dtype conversions), streaming, resume that is
byte-identical to an uninterrupted run, and refusal of every kind of bad or foreign store."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataworth.errors import InputError
from dataworth.store.format import (
    ModuleSpec,
    bf16_bits_to_float32,
    float32_to_bf16_bits,
    modules_layout,
    raw_to_float32,
)
from dataworth.store.reader import Store, open_store
from dataworth.store.tensors import load_tensors, save_tensors
from dataworth.store.writer import StoreWriter

HEADER = {
    "projection": {"kind": "random", "seed": 0, "k": 4},
    "model": {"fingerprint": "ab12" * 16},
    "data": {"fingerprint": "ffee" * 16},
    "config": {"batch_size": 8, "loss": "sum"},
}
MODULES = modules_layout([("layers.0.mlp", 3, 4), ("layers.0.attn", 2, 5, "in_out"), ("lm_head", 1, 3)])
DIM = 12 + 10 + 3


def torch_reference(x: np.ndarray, dtype: str) -> np.ndarray:
    """What torch makes of float32 ``x`` in ``dtype``, widened back to float32 (the obviously-correct oracle)."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return t.to(getattr(torch, dtype)).float().numpy()


def make_rows(n: int, dim: int, seed: int) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = (rng.standard_normal((n, dim)) * 10.0 ** rng.integers(-6, 4, size=(n, 1))).astype(np.float32)
    ids = [f"doc-{seed}-{i}" for i in range(n)]
    loss = rng.random(n) * 7
    tokens = rng.integers(1, 500, size=n)
    return rows, ids, loss, tokens


def write_store(path: Path, rows, ids, loss, tokens, *, shard_rows: int, dtype: str = "float32",
                modules=MODULES, header=HEADER, stop_after: int | None = None, **kw) -> StoreWriter:
    """Write ``rows`` shard by shard (optionally stopping after ``stop_after`` shards, like a killed run)."""
    writer = StoreWriter(path, modules=modules, dtype=dtype, shard_rows=shard_rows, header=header, **kw)
    for index, start in enumerate(range(0, len(rows), shard_rows)):
        if index < writer.done_shards:
            continue
        if stop_after is not None and index >= stop_after:
            return writer
        stop = start + shard_rows
        writer.write_shard(index, rows[start:stop], ids[start:stop], loss[start:stop], tokens[start:stop])
    return writer


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path → bytes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def small_store(tmp_path) -> tuple[Store, np.ndarray]:
    rows, ids, loss, tokens = make_rows(10, DIM, seed=1)
    store = write_store(tmp_path / "s", rows, ids, loss, tokens, shard_rows=4).finalize()
    return store, rows


# ---------------------------------------------------------------------------------------------------------
# bfloat16 bits


def test_bf16_widening_is_exact_for_all_65536_bit_patterns():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    ours = bf16_bits_to_float32(bits)
    theirs = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    nan = np.isnan(theirs)
    assert np.array_equal(np.isnan(ours), nan)
    assert np.array_equal(ours[~nan].view(np.uint32), theirs[~nan].view(np.uint32))


def test_bf16_rounding_matches_torch_on_a_million_random_bit_patterns_and_edge_values():
    rng = np.random.default_rng(0)
    patterns = rng.integers(0, 1 << 32, size=1 << 20, dtype=np.uint64).astype(np.uint32)
    edges = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x00000001, 0x007FFFFF, 0x3F808000, 0x3F818000,
                      0x3F807FFF, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000, 0x00008000], dtype=np.uint32)
    x = np.concatenate([patterns, edges]).view(np.float32)
    x = x[~np.isnan(x)]
    ours = float32_to_bf16_bits(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, theirs)


def test_bf16_rounding_keeps_nan_as_nan():
    x = np.array([np.nan, -np.nan], dtype=np.float32)
    x = np.concatenate([x, np.array([0x7F800001, 0xFFFFFFFF], dtype=np.uint32).view(np.float32)])
    assert np.isnan(bf16_bits_to_float32(float32_to_bf16_bits(x))).all()


@given(st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=50))
def test_bf16_rounding_matches_torch_on_hypothesis_floats(values):
    x = np.array(values, dtype=np.float32)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(float32_to_bf16_bits(x), theirs)


# ---------------------------------------------------------------------------------------------------------
# Round trip


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from(["float16", "bfloat16", "float32"]),
    shapes=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4), st.sampled_from(["out_in", "in_out"])),
                    min_size=1, max_size=3),
    n=st.integers(0, 23),
    shard_rows=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_round_trip_rows_ids_loss_tokens_equal_torch_conversion(dtype, shapes, n, shard_rows, seed):
    modules = modules_layout([(f"m{i}", ko, ki, lay) for i, (ko, ki, lay) in enumerate(shapes)])
    dim = sum(m.size for m in modules)
    rows, ids, loss, tokens = make_rows(n, dim, seed)
    with tempfile.TemporaryDirectory() as tmp:
        writer = write_store(Path(tmp) / "s", rows, ids, loss, tokens, shard_rows=shard_rows, dtype=dtype,
                             modules=modules)
        store = writer.finalize()
        assert (store.rows, store.dim, store.dtype, store.modules) == (n, dim, dtype, modules)
        expected = rows if dtype == "float32" else torch_reference(rows, dtype)
        got = store.matrix()
        assert got.dtype == np.float32
        assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))  # bit-exact, incl. -0.0
        assert store.ids == ids
        assert np.array_equal(store.loss, loss) and store.loss.dtype == np.float64
        assert np.array_equal(store.tokens, tokens) and store.tokens.dtype == np.int64
        reopened = open_store(Path(tmp) / "s")
        assert np.array_equal(reopened.matrix(), got) and reopened.ids == ids
        assert len(reopened.shard_paths) == -(-n // shard_rows)


def test_manifest_has_the_contract_keys(small_store):
    store, _ = small_store
    m = json.loads((store.path / "manifest.json").read_text())
    assert (m["format"], m["version"], m["complete"], m["rows"], m["dim"]) == ("dataworth-store", 1, True, 10, DIM)
    assert m["modules"][1] == {"name": "layers.0.attn", "k_out": 2, "k_in": 5, "offset": 12, "size": 10,
                               "layout": "in_out"}
    assert [s["file"] for s in m["shards"]] == ["shards/00000.npy", "shards/00001.npy", "shards/00002.npy"]
    assert [(s["rows"], s["first_row"]) for s in m["shards"]] == [(4, 0), (4, 4), (2, 8)]
    assert m["model"] == HEADER["model"] and m["config"] == HEADER["config"] and m["shard_rows"] == 4
    assert store.fingerprint == HEADER["model"]["fingerprint"]


def test_write_shard_accepts_torch_tensors_of_any_float_dtype(tmp_path):
    rows, ids, loss, tokens = make_rows(3, DIM, seed=4)
    writer = StoreWriter(tmp_path / "s", modules=MODULES, dtype=torch.bfloat16, shard_rows=3, header=HEADER)
    writer.write_shard(0, torch.from_numpy(rows).to(torch.bfloat16), ids, loss, torch.from_numpy(tokens))
    assert np.array_equal(writer.finalize().matrix(), torch_reference(rows, "bfloat16"))


def test_empty_store_round_trips(tmp_path):
    store = StoreWriter(tmp_path / "s", modules=MODULES, dtype="float16", shard_rows=4, header=HEADER).finalize()
    assert store.rows == 0 and store.matrix().shape == (0, DIM) and store.ids == [] and list(store.iter_blocks()) == []


# ---------------------------------------------------------------------------------------------------------
# Streaming and module views


def test_iter_blocks_over_many_small_shards_with_odd_block_sizes_equals_matrix(tmp_path):
    rows, ids, loss, tokens = make_rows(37, DIM, seed=2)
    store = write_store(tmp_path / "s", rows, ids, loss, tokens, shard_rows=3, dtype="bfloat16").finalize()
    whole = store.matrix()
    assert np.array_equal(whole, torch_reference(rows, "bfloat16"))
    for block_rows in (None, 1, 2, 5, 7, 36, 37, 100):
        blocks = list(store.iter_blocks(block_rows))
        size = block_rows or 3
        assert [start for start, _ in blocks] == list(range(0, 37, size))
        assert all(b.dtype == np.float32 and len(b) <= size for _, b in blocks)
        assert np.array_equal(np.concatenate([b for _, b in blocks]), whole)
    for start, stop in [(0, 0), (2, 3), (2, 4), (5, 29), (36, 37), (0, 37)]:
        assert np.array_equal(store.read_rows(start, stop), whole[start:stop])
    with pytest.raises(IndexError):
        store.read_rows(30, 38)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_reused_blocks_equal_fresh_blocks_for_every_dtype_and_blocks_across_shards(tmp_path, dtype):
    rows, ids, loss, tokens = make_rows(37, DIM, seed=3)
    store = write_store(tmp_path / "s", rows, ids, loss, tokens, shard_rows=4, dtype=dtype).finalize()
    whole = store.matrix()
    assert np.array_equal(whole, torch_reference(rows, dtype))
    for block_rows in (1, 3, 4, 5, 37):
        seen = []
        for start, block in store.iter_blocks(block_rows, reuse=True):
            assert block.dtype == np.float32
            seen.append((start, block.copy()))  # a reused block is valid until the next one: copy it
        fresh = list(store.iter_blocks(block_rows))
        ranges = [(s, min(s + block_rows, 37)) for s in range(0, 37, block_rows)]
        raw = [(s, b.copy()) for s, b in store.iter_row_ranges(ranges, raw=True)]
        assert all(np.array_equal(b, store.raw_rows(s, s + len(b))) for s, b in raw)
        assert [s for s, _ in seen] == [s for s, _ in fresh]
        assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(seen, fresh))
    for raw in (False, True):  # blocks are read into the reader's own arrays, never taken from a memory map
        start, block = next(store.iter_row_ranges([(0, 4)], reuse=True, raw=raw))
        assert not isinstance(block, np.memmap) and not isinstance(block.base, np.memmap)
    assert not store._maps


def test_a_consumer_that_stops_early_leaves_no_prefetch_thread_behind(tmp_path):
    import threading

    rows, ids, loss, tokens = make_rows(37, DIM, seed=4)
    store = write_store(tmp_path / "s", rows, ids, loss, tokens, shard_rows=4, dtype="float16").finalize()
    blocks = store.iter_blocks(3, reuse=True)
    start, first = next(blocks)
    assert start == 0 and np.array_equal(first, store.read_rows(0, 3))
    blocks.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("dataworth-prefetch")]


def test_float16_widening_equals_numpy_for_all_65536_bit_patterns():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    halves = bits.view(np.float16)
    ours = raw_to_float32(halves, "float16")
    theirs = halves.astype(np.float32)
    nan = np.isnan(theirs)
    assert np.array_equal(np.isnan(ours), nan)
    assert np.array_equal(ours[~nan].view(np.uint32), theirs[~nan].view(np.uint32))
    out = np.full((256, 256), 7.0, dtype=np.float32)
    assert raw_to_float32(bits.reshape(256, 256), "bfloat16", out=out) is out
    assert np.array_equal(out.reshape(-1).view(np.uint32)[~np.isnan(out.reshape(-1))],
                          bf16_bits_to_float32(bits)[~np.isnan(out.reshape(-1))].view(np.uint32))


def test_shard_array_is_a_raw_memmap(small_store):
    store, rows = small_store
    shard = store.shard_array(1)
    assert isinstance(shard, np.memmap) and shard.dtype == np.float32 and not shard.flags.writeable
    assert np.array_equal(shard, rows[4:8])


def test_module_rows_give_each_modules_gradient_as_k_out_by_k_in_for_both_layouts(tmp_path):
    rng = np.random.default_rng(3)
    grads = {m.name: rng.standard_normal((6, m.k_out, m.k_in)).astype(np.float32) for m in MODULES}
    # The row: each module's Ĝ flattened row-major, or Ĝᵀ for layout "in_out".
    rows = np.concatenate(
        [(grads[m.name].transpose(0, 2, 1) if m.layout == "in_out" else grads[m.name]).reshape(6, -1)
         for m in MODULES], axis=1)
    store = write_store(tmp_path / "s", rows, [str(i) for i in range(6)], np.zeros(6), np.ones(6, int),
                        shard_rows=4).finalize()
    block = store.matrix()
    for m in MODULES:
        view = store.module_rows(block, m.name)
        assert view.shape == (6, m.k_out, m.k_in) and np.shares_memory(view, block)
        assert np.array_equal(view, grads[m.name])
        assert store.module(m.name) == m
    with pytest.raises(InputError, match="no module 'nope'"):
        store.module("nope")


def test_modules_layout_tiles_the_row_in_order():
    specs = modules_layout([("a", 2, 3), ModuleSpec("b", 4, 1, 99, 99, "in_out"), ("c", 1, 1)])
    assert [(s.name, s.offset, s.size, s.layout) for s in specs] == [("a", 0, 6, "out_in"), ("b", 6, 4, "in_out"),
                                                                     ("c", 10, 1, "out_in")]
    with pytest.raises(InputError, match="repeated"):
        modules_layout([("a", 1, 1), ("a", 1, 1)])
    with pytest.raises(InputError, match="layout"):
        modules_layout([("a", 1, 1, "sideways")])


# ---------------------------------------------------------------------------------------------------------
# Resume, determinism, overwrite


def test_resume_after_crash_is_byte_identical_to_an_uninterrupted_run(tmp_path):
    rows, ids, loss, tokens = make_rows(11, DIM, seed=5)
    kw = dict(shard_rows=3, dtype="bfloat16")
    write_store(tmp_path / "straight", rows, ids, loss, tokens, **kw).finalize()

    crashed = tmp_path / "crashed"
    writer = write_store(crashed, rows, ids, loss, tokens, stop_after=2, **kw)
    assert writer.done_shards == 2
    del writer
    # A killed run: a half-written tmp file and a whole shard file the manifest never listed.
    (crashed / "shards/00002.npy.tmp-123").write_bytes(b"\x93NUMPY half")
    np.save(crashed / "shards/00002.npy", np.ones((3, DIM), np.uint16))
    (crashed / "manifest.json.tmp-77").write_text("{")
    (crashed / "curvature").mkdir()
    (crashed / "curvature/partial.safetensors.tmp-5").write_bytes(b"half")
    with pytest.raises(InputError, match="incomplete.*run extract again to resume"):
        open_store(crashed)

    # A header given in another key order is the same header.
    reordered = {k: dict(reversed(list(v.items()))) for k, v in reversed(list(HEADER.items()))}
    resumed = StoreWriter(crashed, modules=MODULES, header=reordered, **kw)
    assert resumed.done_shards == 2 and resumed.done_rows == 6 and not resumed.complete
    assert not (crashed / "shards/00002.npy").exists() and not (crashed / "shards/00002.npy.tmp-123").exists()
    write_store(crashed, rows, ids, loss, tokens, header=reordered, **kw).finalize()
    (crashed / "curvature").rmdir()  # the only difference: an empty directory the killed run made
    assert tree_bytes(crashed) == tree_bytes(tmp_path / "straight")

    again = StoreWriter(crashed, modules=MODULES, header=HEADER, **kw)  # resuming a finished store
    assert again.complete and again.done_shards == 4


def test_a_listed_shard_that_was_damaged_is_refused_on_resume(tmp_path):
    rows, ids, loss, tokens = make_rows(6, DIM, seed=6)
    write_store(tmp_path / "s", rows, ids, loss, tokens, shard_rows=3, stop_after=1)
    shard = tmp_path / "s/shards/00000.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"checksum error in shards/00000\.npy"):
        StoreWriter(tmp_path / "s", modules=MODULES, dtype="float32", shard_rows=3, header=HEADER)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (dict(header={**HEADER, "model": {"fingerprint": "cd34" * 16}}), "model.fingerprint"),
        (dict(header={**HEADER, "config": {**HEADER["config"], "batch_size": 16}}), "config.batch_size"),
        (dict(header={**HEADER, "projection": {"kind": "random", "seed": 0}}), "projection.k"),
        (dict(dtype="float16"), "dtype"),
        (dict(shard_rows=5), "shard_rows"),
        (dict(modules=modules_layout([("layers.0.mlp", 3, 4), ("layers.0.attn", 2, 5), ("lm_head", 1, 3)])),
         "modules[1].layout"),
    ],
)
def test_a_different_header_is_refused_naming_the_first_differing_key(tmp_path, change, key):
    rows, ids, loss, tokens = make_rows(4, DIM, seed=7)
    write_store(tmp_path / "s", rows, ids, loss, tokens, shard_rows=4).finalize()
    before = tree_bytes(tmp_path / "s")
    kw = dict(modules=MODULES, dtype="float32", shard_rows=4, header=HEADER) | change
    with pytest.raises(InputError) as err:
        StoreWriter(tmp_path / "s", **kw)
    msg = str(err.value)
    assert f"store {key} " in msg and "!= requested" in msg and "--overwrite" in msg and "\n" not in msg
    assert tree_bytes(tmp_path / "s") == before  # nothing touched


def test_refusal_message_shows_both_values(tmp_path):
    StoreWriter(tmp_path / "s", modules=MODULES, dtype="float32", shard_rows=4, header=HEADER)
    with pytest.raises(InputError, match="store model.fingerprint ab12ab12.* != requested cd34cd34"):
        StoreWriter(tmp_path / "s", modules=MODULES, dtype="float32", shard_rows=4,
                    header={**HEADER, "model": {"fingerprint": "cd34" * 16}})


def test_overwrite_replaces_the_old_store_entirely(tmp_path):
    old_rows, old_ids, loss, tokens = make_rows(9, DIM, seed=8)
    old = write_store(tmp_path / "s", old_rows, old_ids, loss, tokens, shard_rows=2).finalize()
    old.save_tensors("curvature/kfac.safetensors", {"A": torch.ones(2, 2)})
    old.save_tensors("covariance/partial/00001.safetensors", {"A": torch.ones(2, 2)})
    (tmp_path / "s/covariance/partial/00002.safetensors.tmp-9").write_bytes(b"half")
    rows, ids, loss, tokens = make_rows(3, DIM, seed=9)
    header = {**HEADER, "model": {"fingerprint": "new"}}
    write_store(tmp_path / "s", rows, ids, loss, tokens, shard_rows=2, header=header, overwrite=True).finalize()
    write_store(tmp_path / "fresh", rows, ids, loss, tokens, shard_rows=2, header=header).finalize()
    assert tree_bytes(tmp_path / "s") == tree_bytes(tmp_path / "fresh")


def test_overwrite_also_replaces_a_store_of_an_unsupported_version(tmp_path):
    StoreWriter(tmp_path / "s", modules=MODULES, dtype="float32", shard_rows=4, header=HEADER)
    m = json.loads((tmp_path / "s/manifest.json").read_text())
    (tmp_path / "s/manifest.json").write_text(json.dumps({**m, "version": 99}))
    with pytest.raises(InputError, match="version"):
        StoreWriter(tmp_path / "s", modules=MODULES, dtype="float32", shard_rows=4, header=HEADER)
    w = StoreWriter(tmp_path / "s", modules=MODULES, dtype="float32", shard_rows=4, header=HEADER, overwrite=True)
    assert w.done_shards == 0


def test_a_non_store_directory_is_refused_and_left_alone_even_with_overwrite(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/thesis.tex").write_text("precious")
    (tmp_path / "other").mkdir()
    (tmp_path / "other/manifest.json").write_text(json.dumps({"format": "something-else"}))
    for target in ("mine", "other"):
        for overwrite in (False, True):
            with pytest.raises(InputError, match=f"{target}.*not a gradient store"):
                StoreWriter(tmp_path / target, modules=MODULES, dtype="float32", shard_rows=4, header=HEADER,
                            overwrite=overwrite)
    assert (tmp_path / "mine/thesis.tex").read_text() == "precious"
    assert json.loads((tmp_path / "other/manifest.json").read_text()) == {"format": "something-else"}
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        StoreWriter(tmp_path / "afile", modules=MODULES, dtype="float32", shard_rows=4, header=HEADER)


def test_write_shard_refuses_out_of_order_and_mismatched_shapes(tmp_path):
    writer = StoreWriter(tmp_path / "s", modules=MODULES, dtype="float32", shard_rows=4, header=HEADER)
    rows, ids, loss, tokens = make_rows(4, DIM, seed=10)
    with pytest.raises(ValueError, match="out of order"):
        writer.write_shard(1, rows, ids, loss, tokens)
    with pytest.raises(ValueError, match=rf"expected \[n, {DIM}\]"):
        writer.write_shard(0, rows[:, :-1], ids, loss, tokens)
    with pytest.raises(ValueError, match="4 rows but 3 ids"):
        writer.write_shard(0, rows, ids[:3], loss, tokens)
    with pytest.raises(ValueError, match="shard_rows"):
        writer.write_shard(0, np.concatenate([rows, rows]), ids * 2, np.tile(loss, 2), np.tile(tokens, 2))
    assert writer.done_shards == 0 and sorted(os.listdir(tmp_path / "s/shards")) == []


# ---------------------------------------------------------------------------------------------------------
# Opening bad stores


def test_a_flipped_byte_is_a_checksum_error_naming_the_shard(small_store):
    store, _ = small_store
    shard = store.path / "shards/00001.npy"
    data = bytearray(shard.read_bytes())
    data[200] ^= 0x40
    shard.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"checksum error in shards/00001\.npy"):
        open_store(store.path)
    assert open_store(store.path, verify=False).rows == 10  # size is right, so only hashing notices


def test_a_damaged_meta_or_ids_file_is_a_checksum_error(small_store):
    store, _ = small_store
    for rel in ("shards/00002.meta.parquet", "ids.parquet"):
        original = (store.path / rel).read_bytes()
        (store.path / rel).write_bytes(original[:-9] + bytes([original[-9] ^ 1]) + original[-8:])
        with pytest.raises(InputError, match=f"checksum error in {rel}"):
            open_store(store.path)
        (store.path / rel).write_bytes(original)


def test_a_truncated_or_missing_shard_is_refused_even_without_hashing(small_store):
    store, _ = small_store
    shard = store.path / "shards/00002.npy"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(InputError, match=r"size .*truncated or padded shard shards/00002\.npy"):
        open_store(store.path, verify=False)
    shard.unlink()
    with pytest.raises(InputError, match=r"missing shard shards/00002\.npy"):
        open_store(store.path, verify=False)


def test_missing_directory_or_manifest_is_refused(tmp_path):
    with pytest.raises(InputError, match="nowhere: no such store directory"):
        open_store(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: not a gradient store"):
        open_store(tmp_path / "empty")
    (tmp_path / "empty/manifest.json").write_text("{not json")
    with pytest.raises(InputError, match="manifest.json: not valid JSON"):
        open_store(tmp_path / "empty")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"format": "trak"}, "field 'format' is 'trak'"),
        ({"version": 2}, "field 'version' is 2; this dataworth reads store versions 1"),
        ({"complete": False}, r"incomplete \(3 shards written\); run extract again to resume"),
        ({"dim": DIM + 1}, "module sizes add up to 25 but dim is 26"),
        ({"rows": 11}, "field 'rows' is 11 but the shards hold 10"),
        ({"dtype": "int8"}, "field 'dtype' is 'int8'"),
        ({"modules": [{**m.to_json(), "offset": m.offset + (i == 2)} for i, m in enumerate(MODULES)]},
         r"modules\[2\].*offset 23 != 22"),
        ({"modules": [{**MODULES[0].to_json(), "size": 11}, *[m.to_json() for m in MODULES[1:]]]},
         r"size 11 != k_out 3 × k_in 4"),
    ],
)
def test_inconsistent_manifests_are_refused_with_the_reason(small_store, edit, message):
    store, _ = small_store
    mpath = store.path / "manifest.json"
    mpath.write_text(json.dumps({**json.loads(mpath.read_text()), **edit}))
    with pytest.raises(InputError, match=message):
        open_store(store.path)


def test_a_manifest_pointing_outside_the_store_is_refused(small_store):
    store, _ = small_store
    mpath = store.path / "manifest.json"
    m = json.loads(mpath.read_text())
    m["shards"][0]["file"] = "../../etc/passwd"
    mpath.write_text(json.dumps(m))
    with pytest.raises(InputError, match=r"shards\[0\].*expected 'shards/00000.npy'"):
        open_store(store.path)


# ---------------------------------------------------------------------------------------------------------
# No pickle


class _Booby:
    def __reduce__(self):
        return (os.mkdir, ("/tmp/dataworth-store-test-pwned",))


def test_store_is_read_with_allow_pickle_false_only(small_store, monkeypatch):
    store, rows = small_store
    calls = []
    real_load = np.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("allow_pickle"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(np, "load", spy)
    reopened = open_store(store.path)
    assert np.array_equal(reopened.matrix(), rows)  # positioned reads of the checked header's raw numbers
    assert np.array_equal(reopened.shard_array(0), rows[:4])
    assert calls and all(flag is False for flag in calls)
    for path in store.path.rglob("*.npy"):
        real_load(path, allow_pickle=False)


def test_a_pickled_shard_is_refused_without_being_unpickled(small_store):
    store, _ = small_store
    evil = np.empty((4, DIM), dtype=object)
    evil[0, 0] = _Booby()
    shard = store.path / "shards/00000.npy"
    with open(shard, "wb") as f:
        np.lib.format.write_array(f, evil, allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):  # the file really carries a pickle payload
        np.load(shard, allow_pickle=False)
    with pytest.raises(InputError, match="00000.npy: holds .*object.* manifest says"):
        open_store(store.path, verify=False)
    assert not Path("/tmp/dataworth-store-test-pwned").exists()


# ---------------------------------------------------------------------------------------------------------
# safetensors side files


def test_safetensors_round_trip_in_writer_and_finished_store(small_store, tmp_path):
    store, _ = small_store
    tensors = {"layers.0.mlp.A": torch.randn(4, 4, dtype=torch.float64), "eig": torch.arange(5.0)[::2],
               "bf": torch.randn(3).to(torch.bfloat16)}
    assert not store.has("curvature/kfac.safetensors")
    with pytest.raises(InputError, match=r"curvature/kfac\.safetensors: missing"):
        store.load_tensors("curvature/kfac.safetensors")
    store.save_tensors("curvature/kfac.safetensors", tensors, {"damping": "0.1"})
    assert store.has("curvature/kfac.safetensors")
    loaded = open_store(store.path).load_tensors("curvature/kfac.safetensors")
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) and loaded[k].dtype == tensors[k].dtype for k in tensors)
    assert store.load_tensor_metadata("curvature/kfac.safetensors") == {"damping": "0.1"}
    assert [p.name for p in (store.path / "curvature").iterdir()] == ["kfac.safetensors"]  # no tmp left
    writer = StoreWriter(tmp_path / "w", modules=MODULES, dtype="float32", shard_rows=4, header=HEADER)
    writer.save_tensors("curvature/cov.safetensors", {"S": torch.eye(3)})
    assert torch.equal(writer.finalize().load_tensors("curvature/cov.safetensors")["S"], torch.eye(3))
    with pytest.raises(InputError, match="inside the store"):
        store.load_tensors("../outside.safetensors")


def test_safetensors_bytes_do_not_depend_on_metadata_order(tmp_path):
    """safetensors writes metadata in hash-map order; the store sorts it so resumed stores stay identical."""
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(2, dtype=torch.float64)}
    metadata = {f"key{i}": str(i) for i in range(12)}
    blobs = set()
    for i in range(6):
        order = sorted(metadata.items(), key=lambda kv: hash((kv[0], i)))
        path = save_tensors(tmp_path, f"t{i}.safetensors", tensors, dict(order))
        blobs.add(path.read_bytes())
        assert load_tensors(tmp_path, f"t{i}.safetensors")["b"].equal(tensors["b"])
    assert len(blobs) == 1
    blob = blobs.pop()
    header = json.loads(blob[8 : 8 + int.from_bytes(blob[:8], "little")])
    assert list(header["__metadata__"]) == sorted(metadata)


STREAM_CHILD = """
import sys
import numpy as np
import torch  # the float16 widening's; imported before the baseline is taken
from dataworth.store.reader import open_store
from dataworth.util import resident_bytes
store = open_store(sys.argv[1], verify=False)
before, highest, total = resident_bytes(), 0, 0.0
for raw in (False, True):
    for start, block in store.iter_row_ranges(((s, min(s + 64, store.rows)) for s in range(0, store.rows, 64)),
                                              reuse=not raw, raw=raw):
        total += float(np.asarray(block[:, :8], dtype=np.float64).sum())
        highest = max(highest, resident_bytes())
print(highest - before)
"""


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_streaming_a_store_keeps_its_rows_out_of_the_resident_set(tmp_path, dtype):
    # 2,048 rows × 16,384 columns = 128 MiB of float32 (64 MiB float16); blocks of 64 rows are 4 MiB. A memory
    # map would leave every page it touched resident: the rise would be the store's size, not two blocks.
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    rows, dim = 2048, 16384
    writer = StoreWriter(tmp_path / "s", modules=modules_layout([("m", 128, 128)]), dtype=dtype, shard_rows=512,
                         header=HEADER)
    for index, start in enumerate(range(0, rows, 512)):
        block = rng.standard_normal((512, dim), dtype=np.float32)
        writer.write_shard(index, block, [str(i) for i in range(start, start + 512)], np.zeros(512),
                           np.ones(512, dtype=np.int64))
    writer.finalize()
    done = subprocess.run([sys.executable, "-c", STREAM_CHILD, str(tmp_path / "s")], capture_output=True,
                          text=True, check=True)
    rise = int(done.stdout.split()[-1])
    store_bytes = rows * dim * (4 if dtype == "float32" else 2)
    assert rise < store_bytes / 4, f"resident set rose by {rise / 2**20:.0f} MiB streaming {store_bytes / 2**20:.0f} MiB"
