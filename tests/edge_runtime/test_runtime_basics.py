"""Device-side basics: importing the runtime pulls in no torch, `info` reports the machine, writes are atomic."""

import json
import os
import stat
import subprocess
import sys

import pytest

from edge_runtime.cli import main
from edge_runtime.files import atomic_directory, atomic_path, write_json_atomic


def test_runtime_import_pulls_in_no_torch_or_transformers():
    """Not even ONNX Runtime's training backends, whose own import loads torch wherever it is installed (here)."""
    code = (
        "import sys, edge_runtime.cli, edge_runtime.trainer, edge_runtime.bundle, edge_runtime.text, "
        "edge_runtime.memory, edge_runtime.profile, edge_runtime.backends, edge_runtime.split_client, "
        "edge_runtime.split_job, edge_runtime.backends.ort, edge_runtime.backends.split_ort;"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    finished = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert finished.stdout.strip() == "[]"


def test_info_reports_memory_cores_and_backends(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["memory_total_bytes"] >= info["memory_available_bytes"] > 0
    assert info["cpu_cores"] >= 1 and set(info["backends"]) == {"ort", "torch"}


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    write_json_atomic(tmp_path / "r.json", {})
    with atomic_directory(tmp_path / "d"):
        pass
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~umask


def test_failed_write_leaves_nothing_behind(tmp_path):
    target = tmp_path / "result.json"
    write_json_atomic(target, {"old": True})
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("power cut")
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_directory_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "bundle"
    with atomic_directory(target) as staging:
        (staging / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_directory(target) as staging:
        (staging / "b").write_text("2")
        raise RuntimeError("interrupted")
    assert [p.name for p in target.iterdir()] == ["a"]
    with atomic_directory(target) as staging:
        (staging / "c").write_text("3")
    assert [p.name for p in target.iterdir()] == ["c"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the inherited peak is a Linux kernel behaviour")
def test_a_trainer_started_by_a_large_process_reports_its_own_peak_not_its_parents():
    held = bytearray(512 * 2**20)
    held[::4096] = b"\x01" * len(held[::4096])  # touch every page so the parent is really 512 MiB resident
    code = "from edge_runtime.monitor import peak_rss_bytes; print(peak_rss_bytes())"
    child = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert int(child.stdout) < 256 * 2**20, f"the child reported {int(child.stdout) >> 20} MiB"
    del held


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's peak can be reset on Linux only")
def test_a_window_sees_a_transient_between_samples_and_the_next_window_forgets_it():
    """Training calls hold the GIL, so the sampler cannot run inside one; the kernel's per-window peak must."""
    from edge_runtime.monitor import PeakMemory

    with PeakMemory(interval=3600) as monitor:  # the sampler never wakes inside this test
        monitor.new_window()
        start = monitor.current
        transient = bytearray(256 * 2**20)
        transient[::4096] = b"\x01" * len(transient[::4096])
        del transient
        assert monitor.window_peak - start > 200 * 2**20
        monitor.new_window()
        assert monitor.window_peak - start < 100 * 2**20
        assert monitor.peak - start > 200 * 2**20
        assert monitor.sampled_peak - start < 100 * 2**20


def test_atomic_writes_sync_the_data_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """Without the syncs, a power cut right after the rename can leave the new name pointing at empty data."""
    from pathlib import Path

    from edge_runtime import files

    calls: list[str] = []
    sync, replace = os.fsync, os.replace
    monkeypatch.setattr(files.os, "fsync", lambda fd: (calls.append(os.readlink(f"/proc/self/fd/{fd}")), sync(fd)))
    monkeypatch.setattr(files.os, "replace", lambda a, b: (calls.append(f"rename {Path(b).name}"), replace(a, b)))
    files.write_text_atomic(tmp_path / "state.json", "{}")
    assert len(calls) == 3 and calls[1] == "rename state.json"
    assert Path(calls[0]).name.startswith(".state.json.") and calls[2] == str(tmp_path)
    calls.clear()
    with files.atomic_directory(tmp_path / "job") as staging:
        (staging / "a.txt").write_text("a")
    assert f"{tmp_path}/job" not in calls[:-2] and calls[-2:] == ["rename job", str(tmp_path)]
    assert any(call.endswith("/a.txt") for call in calls[: calls.index("rename job")])
