"""The command line turns the machine's refusals (permission denied, disk full, read-only file system, a file
where a directory belongs) into one line naming the path and the system's reason, exit 2 — and what was
already written stays valid: an interrupted store resumes to the very store a clean run writes.

Tests may run as root, for whom ``chmod`` denies nothing: the root-proof cases use a path under a regular file
(ENOTDIR / EEXIST, raised by the kernel) or make one call raise the OSError the kernel would (ENOSPC, EROFS,
EACCES); the real ``chmod`` case runs in a subprocess, for root under ``setpriv`` without the capabilities
that override permissions.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import build_llama

from dataworth.cli import cli


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama on disk, 11 training rows (3 shards of 4), 2 queries, a finished store and its scores."""
    root = tmp_path_factory.mktemp("cli")
    build_llama(len(tiny_tokenizer), seed=2).save_pretrained(root / "model")
    tiny_tokenizer.save_pretrained(root / "model")
    rows = [{"id": f"r{i}", "text": f"Alice Smith number {i} was born in Paris."} for i in range(11)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    queries = [{"id": "q0", "prompt": "Where was Alice born?", "response": " Paris."},
               {"id": "q1", "prompt": "Who was born in Paris?", "response": " Alice Smith."}]
    (root / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (root / "a_file").write_text("not a directory\n")
    assert run(*extract_args(root, root / "store")).exit_code == 0
    assert run("score", "--store", str(root / "store"), "--queries", str(root / "q.jsonl"), "--out",
               str(root / "scores"), "--curvature", "none", "--device", "cpu").exit_code == 0
    return root


def extract_args(root: Path, out: Path) -> list[str]:
    return ["extract", "--model", str(root / "model"), "--data", str(root / "train.jsonl"), "--out", str(out),
            "--rank", "2", "--modules", "mlp", "--dtype", "float32", "--shard-rows", "4", "--device", "cpu"]


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def assert_one_line_error(result, *expected: str) -> str:
    """Exit 2, no traceback, and a last line ``error: …`` holding every ``expected`` piece."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: "), result.output
    for piece in expected:
        assert piece in line, line
    return line


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_os_error_line_names_the_path_and_the_system_reason():
    from dataworth.cli import os_error_line

    assert os_error_line(PermissionError(errno.EACCES, "Permission denied", "/data/x.jsonl")) == \
        "/data/x.jsonl: Permission denied"
    assert os_error_line(OSError(errno.EXDEV, "Invalid cross-device link", "/a/x", None, "/b/x")) == \
        "/a/x -> /b/x: Invalid cross-device link"
    assert os_error_line(OSError(errno.ENOSPC, "No space left on device")) == "No space left on device"
    assert os_error_line(OSError("a library's own message")) == "a library's own message"


def test_disk_full_in_the_middle_of_extract_is_one_line_and_the_store_then_resumes(world, tmp_path, monkeypatch):
    """The second shard's write fails as a full disk fails (ENOSPC from write(), which names no file): one
    line naming the shard, exit 2; the same command afterwards resumes from the first shard and gives a
    store byte-identical to one written without interruption."""
    real = np.lib.format.write_array
    calls = {"n": 0}

    def full_disk(fp, array, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            fp.write(b"\x93NUMPY partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fp, array, *args, **kwargs)

    out = tmp_path / "store"
    monkeypatch.setattr(np.lib.format, "write_array", full_disk)
    assert_one_line_error(run(*extract_args(world, out)), str(out / "shards" / "00001.npy"), "No space left on device")
    monkeypatch.setattr(np.lib.format, "write_array", real)
    assert not list(out.rglob("*.tmp-*"))  # nothing half-written that could look whole
    assert len(json.loads((out / "manifest.json").read_text())["shards"]) == 1
    resumed = run(*extract_args(world, out))
    assert resumed.exit_code == 0, resumed.output
    assert "(1 already done)" in resumed.output
    clean = world / "store"
    a, b = files(out), files(clean)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), [k for k in a if a.get(k) != b.get(k)]


@pytest.mark.parametrize("command", ["extract", "score", "report", "value"])
def test_an_output_under_a_regular_file_is_one_line_naming_the_path(world, command):
    """ENOTDIR from the kernel (root cannot override it): the path and 'Not a directory', exit 2."""
    out = world / "a_file" / "out"
    args = {
        "extract": extract_args(world, out),
        "score": ["score", "--store", str(world / "store"), "--queries", str(world / "q.jsonl"), "--out", str(out),
                  "--curvature", "none", "--device", "cpu"],
        "report": ["report", "--scores", str(world / "scores"), "--out", str(out)],
        "value": ["value", "--scores", str(world / "scores"), "--out", str(out)],
    }[command]
    assert_one_line_error(run(*args), str(world / "a_file"), "Not a directory")


def test_fit_into_a_store_whose_curvature_folder_is_a_file_is_one_line(world, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(world / "store", store)
    shutil.rmtree(store / "curvature", ignore_errors=True)
    (store / "curvature").write_text("in the way\n")
    assert_one_line_error(run("fit", "--store", str(store), "--curvature", "raw"), str(store / "curvature"))
    assert (store / "manifest.json").is_file()


def test_read_only_file_system_and_permission_denied_name_the_path(world, tmp_path, monkeypatch):
    """EROFS when the finished file is moved into place, EACCES when a data file is opened: the OSErrors the
    kernel raises, raised at those calls."""
    import dataworth.data.rows as rows_module
    import dataworth.util as util

    def read_only(src, dst):
        raise OSError(errno.EROFS, "Read-only file system", str(src), None, str(dst))

    monkeypatch.setattr(util.os, "replace", read_only)
    line = assert_one_line_error(run("score", "--store", str(world / "store"), "--queries", str(world / "q.jsonl"),
                                     "--out", str(tmp_path / "s"), "--curvature", "none", "--device", "cpu"),
                                 "Read-only file system", str(tmp_path / "s"))
    assert ".tmp-" not in line  # the file the user asked for, not the temporary one
    monkeypatch.undo()

    data = str(world / "train.jsonl")

    def denied(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(rows_module, "open", denied, raising=False)
    assert_one_line_error(run(*extract_args(world, tmp_path / "x")), f"{data}: Permission denied")


def _without_root_override() -> list[str]:
    """A command prefix under which ``chmod`` denies: none for other users; for root, ``setpriv`` dropping
    the capabilities that let root read and write past permissions (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("runs as root, for whom chmod denies nothing, and setpriv (util-linux) is not installed")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}"]


def test_unreadable_input_and_unwritable_output_with_real_permissions(world, tmp_path):
    """Real EACCES from the kernel, in a real process: an unreadable data file, an output directory that may
    not be written to."""
    prefix = _without_root_override()
    data = tmp_path / "train.jsonl"
    data.write_text((world / "train.jsonl").read_text())
    data.chmod(0)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    args = extract_args(world, tmp_path / "s")
    args[args.index("--data") + 1] = str(data)
    try:
        for command, path in ((args, data),
                              (["report", "--scores", str(world / "scores"), "--out", str(locked / "r")], locked / "r")):
            done = subprocess.run([*prefix, sys.executable, "-m", "dataworth", *command], capture_output=True,
                                  text=True, timeout=300)
            assert done.returncode == 2, done.stderr
            assert "Traceback" not in done.stderr
            assert done.stderr.strip().splitlines()[-1] == f"error: {path}: Permission denied"
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("command", ["extract", "demo"])
def test_a_bad_rank_is_named_by_the_flag_given(world, tmp_path, command):
    """``--rank 0`` was reported as ``--rank-in must be >= 1`` (a flag the user never typed), and by the
    demo only after training."""
    args = extract_args(world, tmp_path / "s") if command == "extract" else ["demo", "--out", str(tmp_path / "d")]
    args += ["--rank", "0"]
    line = assert_one_line_error(run(*args), "--rank must be >= 1, got 0")
    assert "--rank-in" not in line
    assert not (tmp_path / "d" / "model").exists()


def test_error_lines_cannot_be_spoofed_by_the_data_they_quote(tmp_path):
    """An error quotes paths and ids from the data: a bidi override or a carriage return in them is shown
    escaped, so the line reads as what it is."""
    data = tmp_path / "rows.jsonl"
    data = tmp_path / "rows\u202elnosj.jsonl"
    data.write_text('{"text": "x"}\n{"text": "y", "id": "\\r0"}\n{"text": "z", "id": "\\r0"}\n')
    result = run("train", "--data", str(data), "--out", str(tmp_path / "m"))
    assert_one_line_error(result, "rows\\u202elnosj.jsonl:3: duplicate id '\\r0'")
    assert "\u202e" not in result.output and "\r" not in result.output
