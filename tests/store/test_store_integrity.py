"""A store's files are all checked, written by one writer at a time, and never a user's to delete (issue 16).

Every file a store holds has a SHA-256 recorded when it is written and checked when it is read (curvature and
covariance side files included, not only shards); a second writer is refused naming the first one's pid;
``--overwrite`` removes only what a store writer writes and can clear a store whose manifest is damaged;
every written file gets the permissions ``open`` would give it.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import lock_held_by_another_process, write_test_store

import dataworth.util as util
from dataworth.errors import InputError
from dataworth.influence import curvature as C
from dataworth.store.format import modules_layout
from dataworth.store.reader import open_store
from dataworth.store.writer import StoreWriter

HEADER = {"projection": {"kind": "identity"}, "model": {"fingerprint": "fp"}, "data": {}, "config": {}}
MODULES = modules_layout([("a", 2, 3), ("b", 3, 2)])  # D = 6 + 6
LOCK = ".dataworth.lock"


def kfac_factors(rng) -> dict:
    def spd(k):
        m = rng.normal(size=(k, k))
        return m @ m.T + k * np.eye(k)

    return {"a": (spd(2), spd(3)), "b": (spd(3), spd(2))}


@pytest.fixture
def fitted(tmp_path):
    """A finished store (12 rows, KFAC factors) with raw and ekfac fitted."""
    rng = np.random.default_rng(0)
    store = write_test_store(tmp_path / "store", rng.normal(size=(12, 12)), MODULES, HEADER, shard_rows=5,
                             kfac=kfac_factors(rng))
    C.fit(store.path, "raw", 0.1)
    C.fit(store.path, "ekfac", 0.1)
    return store.path


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last float64 of the last tensor: data, not header
    path.write_bytes(bytes(data))


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------------------
# Checksums of side files


def test_a_flipped_byte_in_a_fitted_curvature_is_a_checksum_error_naming_the_file(fitted):
    flip_last_byte(fitted / "curvature/ekfac.safetensors")
    with pytest.raises(InputError) as err:
        C.load_curvature(fitted, "ekfac")
    assert "checksum error in curvature/ekfac.safetensors" in one_line_error(err)
    C.load_curvature(fitted, "raw")  # the other curvature is untouched and still loads


def test_a_flipped_byte_in_the_kfac_factors_is_refused_before_fitting_on_them(fitted):
    flip_last_byte(fitted / "curvature/kfac_factors.safetensors")
    with pytest.raises(InputError) as err:
        C.fit(fitted, "kfac")
    assert "checksum error in curvature/kfac_factors.safetensors" in one_line_error(err)


def test_a_truncated_curvature_is_refused_by_its_size_without_a_safetensors_traceback(fitted):
    target = fitted / "curvature/raw.safetensors"
    target.write_bytes(target.read_bytes()[:-100])
    with pytest.raises(InputError) as err:
        C.load_curvature(fitted, "raw")
    assert "raw.safetensors" in one_line_error(err) and "truncated" in str(err.value)


def test_side_files_are_hashed_once_per_open_store(fitted, monkeypatch):
    hashed = []
    real = util.file_sha256
    monkeypatch.setattr(util, "file_sha256", lambda p: hashed.append(Path(p).name) or real(p))
    store = open_store(fitted, verify=False)
    for _ in range(3):
        C.load_curvature(store, "ekfac")  # reads the KFAC factors' metadata, the curvature and its metadata
    assert hashed.count("ekfac.safetensors") == 1 and hashed.count("kfac_factors.safetensors") <= 1


def test_every_side_file_is_listed_with_its_sha256_in_the_manifest(fitted):
    listed = {e["file"]: e for e in json.loads((fitted / "manifest.json").read_text())["files"]}
    assert {"curvature/kfac_factors.safetensors", "curvature/raw.safetensors",
            "curvature/ekfac.safetensors"} <= set(listed)
    for rel, entry in listed.items():
        assert entry["sha256"] == util.file_sha256(fitted / rel) and entry["size"] == (fitted / rel).stat().st_size


def test_a_store_written_before_file_records_is_read_with_one_note(fitted, capsys):
    """Backward compatible: a manifest without ``files`` (older dataworth) still opens; side files are read
    unchecked, and that is said once."""
    mpath = fitted / "manifest.json"
    manifest = json.loads(mpath.read_text())
    del manifest["files"]
    mpath.write_text(json.dumps(manifest))
    C.load_curvature(fitted, "ekfac")
    C.load_curvature(fitted, "raw")
    notes = [line for line in capsys.readouterr().err.splitlines() if "no checksum" in line]
    assert len(notes) == 1 and "older dataworth" in notes[0]


def test_fitting_does_not_change_the_store_digest(tmp_path):
    store = write_test_store(tmp_path / "s", np.ones((4, 12)), MODULES, HEADER, shard_rows=2)
    before = store.digest
    C.fit(store.path, "raw")
    assert open_store(store.path).digest == before


# ---------------------------------------------------------------------------------------------------------
# Permissions


def test_every_file_of_a_store_gets_the_permissions_open_gives(fitted):
    """safetensors creates its files 0600; a store's curvature must be as readable as its shards."""
    expected = 0o666 & ~util.process_umask()
    modes = {str(p.relative_to(fitted)): p.stat().st_mode & 0o777 for p in fitted.rglob("*") if p.is_file()}
    assert modes["curvature/ekfac.safetensors"] == modes["shards/00000.npy"] == expected
    assert set(modes.values()) == {expected}, modes


# ---------------------------------------------------------------------------------------------------------
# One writer at a time




@pytest.fixture
def held(fitted):
    """Another process holding the store's writer lock."""
    with lock_held_by_another_process(fitted) as pid:
        yield fitted, pid


def test_a_second_writer_is_refused_naming_the_first_writers_pid(held):
    store, pid = held
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    with pytest.raises(InputError) as err:
        StoreWriter(store, modules=MODULES, dtype="float32", shard_rows=5, header=HEADER, overwrite=True)
    assert f"pid {pid}" in one_line_error(err) and "writing this store" in str(err.value)
    with pytest.raises(InputError, match=f"pid {pid}"):
        C.fit(store, "raw")
    result = CliRunner().invoke(__import__("dataworth.cli", fromlist=["cli"]).cli,
                                ["fit", "--store", str(store), "--curvature", "raw"])
    assert result.exit_code == 2 and f"pid {pid}" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == before  # nothing deleted or written


def test_the_lock_of_a_killed_writer_is_taken_over_and_removed_when_done(held):
    store, pid = held
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    assert (store / LOCK).read_text().strip() == str(pid)  # the file stays; its flock went with the process
    C.fit(store, "raw")
    assert not (store / LOCK).exists()


def test_the_lock_is_held_while_writing_and_released_by_finalize(tmp_path):
    writer = StoreWriter(tmp_path / "s", modules=MODULES, dtype="float32", shard_rows=5, header=HEADER)
    fd = os.open(tmp_path / "s" / LOCK, os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert os.pread(fd, 32, 0).decode().strip() == str(os.getpid())
    finally:
        os.close(fd)
    writer.write_shard(0, np.ones((3, 12)), ["a", "b", "c"], np.zeros(3), np.ones(3, dtype=np.int64))
    writer.finalize()
    assert not (tmp_path / "s" / LOCK).exists()


# ---------------------------------------------------------------------------------------------------------
# --overwrite


def write_rows(path, n, *, overwrite=False, header=HEADER):
    writer = StoreWriter(path, modules=MODULES, dtype="float32", shard_rows=5, header=header, overwrite=overwrite)
    for shard, start in enumerate(range(0, n, 5)):
        k = min(5, n - start)
        writer.write_shard(shard, np.full((k, 12), float(n)), [f"r{start + i}" for i in range(k)], np.zeros(k),
                           np.ones(k, dtype=np.int64))
    return writer.finalize()


def test_overwrite_deletes_only_the_files_a_store_writer_owns(fitted):
    mine = {"shards/README.txt": "how these shards were made", "notes.md": "mine", "mine.safetensors": "weights",
            "curvature/notes.txt": "k", "covariance/keep.npy": "x", "projection/readme": "y"}
    for rel, text in mine.items():
        (fitted / rel).parent.mkdir(parents=True, exist_ok=True)
        (fitted / rel).write_text(text)
    store = write_rows(fitted, 7, overwrite=True, header={**HEADER, "model": {"fingerprint": "other"}})
    assert {rel: (fitted / rel).read_text() for rel in mine} == mine
    assert store.rows == 7 and not (fitted / "curvature/ekfac.safetensors").exists()
    assert sorted(p.name for p in (fitted / "shards").iterdir()) == [
        "00000.meta.parquet", "00000.npy", "00001.meta.parquet", "00001.npy", "README.txt"]


def test_a_damaged_manifest_says_how_to_fix_it_and_overwrite_clears_the_store(fitted):
    mpath = fitted / "manifest.json"
    mpath.write_bytes(mpath.read_bytes()[:150])  # truncated mid-way: not JSON any more
    with pytest.raises(InputError) as err:
        open_store(fitted)
    assert "--overwrite" in one_line_error(err)
    with pytest.raises(InputError, match="--overwrite"):
        StoreWriter(fitted, modules=MODULES, dtype="float32", shard_rows=5, header=HEADER)
    store = write_rows(fitted, 3, overwrite=True)
    assert store.rows == 3 and open_store(fitted).ids == ["r0", "r1", "r2"]


def test_overwrite_leaves_a_directory_that_is_not_a_store_alone_even_with_a_broken_manifest(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/manifest.json").write_text("{ my web app manifest, half written")
    (tmp_path / "mine/app.js").write_text("x")
    with pytest.raises(InputError) as err:
        StoreWriter(tmp_path / "mine", modules=MODULES, dtype="float32", shard_rows=5, header=HEADER, overwrite=True)
    assert "does not look like a gradient store" in one_line_error(err)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["app.js", "manifest.json"]
