"""Reading AlpacaEval-format directories: good data loads, bad data fails naming the file and line."""

from __future__ import annotations

import gzip
import json

import pytest

from evaluators.preference_data import PreferenceDataError, load_preference_data


def _write(path, rows):
    with gzip.open(path, "wt") as fh:
        for row in rows:
            fh.write(row if isinstance(row, str) else json.dumps(row))
            fh.write("\n")


@pytest.fixture
def data_dir(tmp_path):
    _write(tmp_path / "prompts.jsonl.gz", [{"id": "p1", "instruction": "Say hi"}])
    _write(tmp_path / "outputs.jsonl.gz", [{"prompt_id": "p1", "model": "ref", "output": "Hi"},
                                           {"prompt_id": "p1", "model": "m", "output": "Hello there!"}])
    _write(tmp_path / "labels.jsonl.gz", [{"prompt_id": "p1", "model_a": "ref", "model_b": "m", "p_b_better": 0.8,
                                           "annotator": "x"}])
    (tmp_path / "leaderboard.csv").write_text("model,win_rate,lc_win_rate\nm,12.5,\nref,50,50\n")
    return tmp_path


def test_loads_all_parts(data_dir):
    data = load_preference_data(data_dir)
    assert data.prompts == {"p1": "Say hi"}
    assert data.answer("p1", "m") == "Hello there!"
    assert data.pairs[0].p_b_better == 0.8 and data.judged_models() == ["m"]
    assert data.leaderboard["m"].lc_win_rate is None and data.leaderboard["ref"].win_rate == 50


def test_bad_json_names_file_and_line(data_dir):
    _write(data_dir / "labels.jsonl.gz", [{"prompt_id": "p1", "model_a": "ref", "model_b": "m", "p_b_better": 1},
                                          "{not json"])
    with pytest.raises(PreferenceDataError, match=r"labels\.jsonl\.gz:2: not valid JSON"):
        load_preference_data(data_dir)


def test_out_of_range_label_is_rejected(data_dir):
    _write(data_dir / "labels.jsonl.gz", [{"prompt_id": "p1", "model_a": "ref", "model_b": "m", "p_b_better": 2}])
    with pytest.raises(PreferenceDataError, match=r"labels\.jsonl\.gz:1: p_b_better must be in \[0, 1\]"):
        load_preference_data(data_dir)


def test_unknown_prompt_and_missing_file(data_dir):
    _write(data_dir / "outputs.jsonl.gz", [{"prompt_id": "nope", "model": "m", "output": "x"}])
    with pytest.raises(PreferenceDataError, match="prompt_id 'nope' is not in prompts"):
        load_preference_data(data_dir)
    (data_dir / "prompts.jsonl.gz").unlink()
    with pytest.raises(PreferenceDataError, match="file not found"):
        load_preference_data(data_dir)


def test_rows_without_a_preference_are_skipped_and_counted_but_bad_ones_still_fail(data_dir):
    row = {"prompt_id": "p1", "model_a": "ref", "model_b": "m"}
    _write(data_dir / "labels.jsonl.gz", [{**row, "p_b_better": None}, {**row, "p_b_better": 0.25},
                                          '{"prompt_id": "p1", "model_a": "ref", "model_b": "m", "p_b_better": NaN}'])
    (data_dir / "leaderboard.csv").write_text("model,win_rate,lc_win_rate\nm,12.5,nan\nref,,\n")
    data = load_preference_data(data_dir)
    assert [p.p_b_better for p in data.pairs] == [0.25] and data.unlabelled_rows == 2
    assert data.leaderboard["m"].lc_win_rate is None and "ref" not in data.leaderboard
    assert data.sample_prompts(1, seed=0).unlabelled_rows == 2
    with pytest.raises(PreferenceDataError, match="at least 1"):
        data.sample_prompts(0, seed=0)
    _write(data_dir / "labels.jsonl.gz", [{**row, "p_b_better": "0.7"}])
    with pytest.raises(PreferenceDataError, match=r"labels\.jsonl\.gz:1: field 'p_b_better' must be float"):
        load_preference_data(data_dir)


def _second_set(path, instruction="Say bye", leaderboard="model,win_rate,lc_win_rate\nn,30,31\n"):
    path.mkdir()
    _write(path / "prompts.jsonl.gz", [{"id": "p1", "instruction": instruction}])
    _write(path / "outputs.jsonl.gz", [{"prompt_id": "p1", "model": "inc", "output": "Bye"},
                                       {"prompt_id": "p1", "model": "m", "output": "Goodbye!"},
                                       {"prompt_id": "p1", "model": "n", "output": "See you"}])
    _write(path / "labels.jsonl.gz", [{"prompt_id": "p1", "model_a": "inc", "model_b": "m", "p_b_better": 1.0},
                                      {"prompt_id": "p1", "model_a": "inc", "model_b": "n", "p_b_better": None}])
    (path / "leaderboard.csv").write_text(leaderboard)
    return path


def test_several_directories_load_as_one_set_without_mixing_their_prompts(data_dir, tmp_path):
    from evaluators.preference_data import load_preference_sets

    other = _second_set(tmp_path / "traffic")
    data = load_preference_sets([data_dir, other])
    # the same id in two directories is two prompts; each answer stays with its own prompt
    assert data.prompts == {"p1": "Say hi", "1:p1": "Say bye"}
    assert data.answer("p1", "m") == "Hello there!" and data.answer("1:p1", "m") == "Goodbye!"
    assert [(p.prompt_id, p.model_a, p.model_b) for p in data.pairs] == [("p1", "ref", "m"), ("1:p1", "inc", "m")]
    assert data.judged_models() == ["m"]  # one model, held out everywhere by a split
    assert sorted(data.leaderboard) == ["m", "n", "ref"] and data.unlabelled_rows == 1
    assert data.source == f"{data_dir} + {other}"
    assert load_preference_sets([data_dir]).prompts == load_preference_data(data_dir).prompts


def test_several_directories_refuse_conflicting_leaderboards_and_nothing(data_dir, tmp_path):
    from evaluators.preference_data import load_preference_sets

    other = _second_set(tmp_path / "traffic", leaderboard="model,win_rate,lc_win_rate\nm,40,41\n")
    with pytest.raises(PreferenceDataError, match="row of 'm' differs"):
        load_preference_sets([data_dir, other])
    with pytest.raises(PreferenceDataError, match="no data directory"):
        load_preference_sets([])


@pytest.mark.parametrize("corrupt, message", [
    (lambda d: (d / "prompts.jsonl.gz").write_bytes(gzip.compress(b'{"id": "p1", "instruction": "\xff"}\n')),
     r"prompts\.jsonl\.gz: cannot read: .*utf-8"),
    (lambda d: _write(d / "labels.jsonl.gz", ['{"prompt_id": "p1", "model_a": "ref", "model_b": "m", '
                                              '"p_b_better": 1' + "0" * 400 + "}"]),
     r"labels\.jsonl\.gz:1: field 'p_b_better' is too large"),
    (lambda d: _write(d / "labels.jsonl.gz", ["[" * 100_000]), r"labels\.jsonl\.gz:1: not valid JSON: nested"),
    (lambda d: (d / "leaderboard.csv").write_bytes(b"model,win_rate,lc_win_rate\n\xff,1,2\n"),
     r"leaderboard\.csv: cannot read: .*utf-8"),
    (lambda d: ((d / "leaderboard.csv").unlink(), (d / "leaderboard.csv").mkdir()), r"leaderboard\.csv: cannot read"),
    (lambda d: (d / "leaderboard.csv").write_text("model,win_rate,lc_win_rate\nm,inf,3\n"),
     r"leaderboard\.csv:2: bad leaderboard row: win rates must be finite"),
    (lambda d: (d / "leaderboard.csv").write_text("model,win_rate,lc_win_rate\nm,10,11\nm,12,11\n"),
     r"leaderboard\.csv:3: 'm' is listed twice with different win rates"),
])
def test_unreadable_or_impossible_input_is_one_error_naming_the_file(data_dir, corrupt, message):
    corrupt(data_dir)
    with pytest.raises(PreferenceDataError, match=message):
        load_preference_data(data_dir)


def test_the_same_directory_twice_is_refused(data_dir):
    from evaluators.preference_data import load_preference_sets

    with pytest.raises(PreferenceDataError, match="given more than once"):
        load_preference_sets([data_dir, f"{data_dir}/."])


def test_files_saved_with_a_byte_order_mark_read_like_files_without(data_dir):
    """Excel and pandas' to_csv(encoding="utf-8-sig") start a file with U+FEFF; it is not part of the first field."""
    plain = load_preference_data(data_dir)
    (data_dir / "leaderboard.csv").write_bytes(b"\xef\xbb\xbf" + (data_dir / "leaderboard.csv").read_bytes())
    for name in ("prompts", "outputs", "labels"):
        raw = gzip.decompress((data_dir / f"{name}.jsonl.gz").read_bytes())
        (data_dir / f"{name}.jsonl.gz").write_bytes(gzip.compress(b"\xef\xbb\xbf" + raw))
    with_bom = load_preference_data(data_dir)
    assert with_bom.leaderboard == plain.leaderboard and with_bom.leaderboard["m"].win_rate == 12.5
    assert (with_bom.prompts, with_bom.outputs, with_bom.pairs) == (plain.prompts, plain.outputs, plain.pairs)


LABEL = {"prompt_id": "p1", "model_a": "ref", "model_b": "m", "p_b_better": 0.8, "annotator": "x"}


def test_a_repeated_label_row_is_one_pair_and_is_counted(data_dir):
    _write(data_dir / "labels.jsonl.gz", [LABEL, LABEL, {**LABEL, "annotator": "y"}, LABEL])
    data = load_preference_data(data_dir)
    assert [p.annotator for p in data.pairs] == ["x", "y"]  # another annotator's label is another judgment
    assert data.duplicate_label_rows == 2 and data.sample_prompts(1, seed=0).duplicate_label_rows == 2


def test_a_repeated_label_row_with_another_label_is_refused_naming_both_lines(data_dir):
    _write(data_dir / "labels.jsonl.gz", [LABEL, {**LABEL, "model_b": "ref"}, {**LABEL, "p_b_better": 0.3}])
    with pytest.raises(PreferenceDataError, match=r"labels\.jsonl\.gz:3: p_b_better 0\.3 contradicts line 1's 0\.8"):
        load_preference_data(data_dir)


def test_label_rows_whose_answers_are_missing_are_counted_by_reason(data_dir, tmp_path):
    from evaluators.preference_data import load_preference_sets

    _write(data_dir / "labels.jsonl.gz", [LABEL, {**LABEL, "model_a": "gone"}, {**LABEL, "model_b": "gone"},
                                          {**LABEL, "model_a": "gone", "annotator": "y"},
                                          {**LABEL, "prompt_id": "p9"}])
    data = load_preference_data(data_dir)
    assert len(data.pairs) == 1
    assert data.rows_without_answers == {"no output of model_a": 2, "no output of model_b": 1,
                                         "prompt_id not in prompts": 1}
    both = load_preference_sets([data_dir, _second_set(tmp_path / "traffic")])
    assert both.rows_without_answers == data.rows_without_answers and both.duplicate_label_rows == 0


def test_a_heldout_model_is_held_out_on_both_sides_of_a_pair(data_dir):
    """Traffic labels after a promotion: yesterday's candidate (held out) is today's incumbent, model_a of pairs that
    judge a training model. Its answers must not reach training, nor a training model's the held-out figures."""
    from evaluators.preference_data import ModelSplit

    models = ["m", "held", "other"]
    _write(data_dir / "outputs.jsonl.gz", [{"prompt_id": "p1", "model": m, "output": m} for m in ["ref", *models]])
    _write(data_dir / "labels.jsonl.gz", [
        {**LABEL, "model_b": "m"}, {**LABEL, "model_b": "held"}, {**LABEL, "model_b": "other"},
        {**LABEL, "model_a": "held", "model_b": "m"},  # a held-out incumbent against a training candidate
        {**LABEL, "model_a": "m", "model_b": "held"},  # a training incumbent against a held-out candidate
        {**LABEL, "model_a": "other", "model_b": "m"},  # training models on both sides: kept
    ])
    data = load_preference_data(data_dir)
    split = ModelSplit(train_models=("m", "other"), heldout_models=("held",))
    assert [(p.model_a, p.model_b) for p in split.train_pairs(data)] == [("ref", "m"), ("ref", "other"),
                                                                         ("other", "m")]
    assert [(p.model_a, p.model_b) for p in split.heldout_pairs(data)] == [("ref", "held")]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p1", "a": "ref", "b": "m", "pref": 0.8},
     r"labels\.jsonl\.gz:2: no field 'prompt_id' \(fields: prompt, a, b, pref\)"),
    ({k: v for k, v in LABEL.items() if k != "model_a"}, r"labels\.jsonl\.gz:2: no field 'model_a'"),
    ({k: v for k, v in LABEL.items() if k != "p_b_better"}, r"labels\.jsonl\.gz:2: no field 'p_b_better'"),
    ({**LABEL, "model_b": None, "p_b_better": None}, r"labels\.jsonl\.gz:2: field 'model_b' must be str"),
])
def test_a_label_row_with_other_columns_is_malformed_not_unlabelled(data_dir, row, message):
    """A labels file with other column names read as 'every row unlabelled': the bench measured nothing and exited
    0, and training blamed the outputs. Only a present null / NaN preference is a row without a label."""
    _write(data_dir / "labels.jsonl.gz", [LABEL, row])
    with pytest.raises(PreferenceDataError, match=message):
        load_preference_data(data_dir)
    _write(data_dir / "labels.jsonl.gz", [LABEL, {**LABEL, "annotator": "y", "p_b_better": None}])
    assert load_preference_data(data_dir).unlabelled_rows == 1


@pytest.mark.parametrize("text, message", [
    ("name,score\nm,1\n", r"leaderboard\.csv:1: the header has no 'model' or 'win_rate' column"),
    ("model,lc_win_rate\nm,12\n", r"leaderboard\.csv:1: the header has no 'win_rate' column"),
    ("", r"leaderboard\.csv:1: the header has no 'model' or 'win_rate' column"),
    ("model,win_rate,lc_win_rate\nm,12.5,\nref\n", r"leaderboard\.csv:3: bad leaderboard row: 3 columns"),
    ("model,win_rate\nm,12.5,1,2\n", r"leaderboard\.csv:2: bad leaderboard row: 2 columns"),
])
def test_a_leaderboard_without_its_columns_is_malformed_not_unranked(data_dir, text, message):
    (data_dir / "leaderboard.csv").write_text(text)
    with pytest.raises(PreferenceDataError, match=message):
        load_preference_data(data_dir)


def test_a_directory_without_model_outputs_says_so(data_dir):
    """Empty files blamed the judge's training set ('every judged model in it was in the judge's training set')."""
    _write(data_dir / "outputs.jsonl.gz", [])
    with pytest.raises(PreferenceDataError, match=f"{data_dir}: no model outputs in outputs.jsonl.gz"):
        load_preference_data(data_dir, require_labels=False)


@pytest.mark.parametrize("name", ["MINI_DATA", "FULL_DATA"])
def test_the_shipped_alpacaeval_sets_still_load(name):
    from evaluators import preference_data

    directory = getattr(preference_data, name)
    if not directory.is_dir():
        pytest.skip(f"{directory} is not beside this checkout")
    data = load_preference_data(directory)
    assert len(data.pairs) > 1000 and len(data.leaderboard) >= 10 and data.unlabelled_rows == 0
