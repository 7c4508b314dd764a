"""The judge benches' command lines: bad arguments and unloadable judges are one line and an exit status."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from evaluators.preference_data import MINI_DATA
from evaluators.small_judge import SPEC_FILE, WEIGHTS_FILE, JudgeLoadError, JudgeSpec, SmallJudge

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _judge_dir(path: Path, weights: bytes | None = None, spec: str | None = None) -> Path:
    path.mkdir()
    (path / SPEC_FILE).write_text(JudgeSpec().to_json() if spec is None else spec)
    (path / WEIGHTS_FILE).write_bytes(weights or b"")
    return path


def _cut_npz(tmp_path: Path) -> bytes:
    np.savez(tmp_path / "whole.npz", w=np.zeros((64, 8), dtype=np.float32))
    return (tmp_path / "whole.npz").read_bytes()[:100]


def _pickled_npz(tmp_path: Path) -> bytes:
    np.savez(tmp_path / "objects.npz", w=np.array([{"not": "an array"}], dtype=object))
    return (tmp_path / "objects.npz").read_bytes()


@pytest.mark.parametrize("weights", [lambda _: b"not a zip", _cut_npz, _pickled_npz])
def test_unreadable_head_weights_are_a_load_error_naming_the_file(tmp_path, weights):
    directory = _judge_dir(tmp_path / "judge", weights(tmp_path))
    with pytest.raises(JudgeLoadError, match=f"{directory / WEIGHTS_FILE}: not readable as head weights") as err:
        SmallJudge.load(directory)
    assert "unsafely" not in str(err.value)  # numpy's advice to unpickle an untrusted file is not passed on


@pytest.mark.parametrize("spec, message", [("[]", "expected a JSON object"),
                                           ('{"format_version": 2}', "judge format 2 is not 1")])
def test_an_unreadable_judge_json_is_a_load_error_naming_the_file(tmp_path, spec, message):
    directory = _judge_dir(tmp_path / "judge", b"", spec)
    with pytest.raises(JudgeLoadError, match=f"{directory / SPEC_FILE}: {message}"):
        SmallJudge.load(directory)


def test_judge_quality_on_an_unloadable_judge_prints_one_line(tmp_path, capsys):
    directory = _judge_dir(tmp_path / "judge", b"not a zip")
    status = _bench("judge_quality").main(["--data", str(MINI_DATA), "--model-uri", str(directory), "--no-progress"])
    err = capsys.readouterr().err
    assert status == 1 and err.count("\n") == 1 and err.startswith(f"error: {directory / WEIGHTS_FILE}")


@pytest.mark.parametrize("option", ["--pairs", "--batch"])
@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_judge_speed_refuses_a_count_below_one(tmp_path, monkeypatch, capsys, option, value):
    monkeypatch.chdir(tmp_path)  # nothing of a default tracking store may land in the checkout
    with pytest.raises(SystemExit) as exit_:
        _bench("judge_speed").main([option, value, "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
                                    "--registered-name", "absent"])
    assert exit_.value.code == 2 and f"argument {option}:" in capsys.readouterr().err
