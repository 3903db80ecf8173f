"""bench/fp8_speed.py's host-side parts on the CPU (the script itself needs an sm_89+ GPU)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import fp8_speed  # noqa: E402


def test_commit_without_git_or_a_repository(monkeypatch, tmp_path):
    """The device machine gets the tree without .git and maybe without git: no crash at the start."""
    monkeypatch.setenv("RMSERVE_COMMIT", "abc1234")
    assert fp8_speed.commit() == "abc1234"
    monkeypatch.delenv("RMSERVE_COMMIT")
    monkeypatch.setenv("PATH", str(tmp_path))   # no git binary
    assert fp8_speed.commit() == "unknown"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", os.defpath)      # git, no repository: empty output
    assert fp8_speed.commit() == "unknown"
