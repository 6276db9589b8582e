"""python -m tinytf.seq2seq: the generated date data (words, held-out days), and train then translate as a user
types them, on a tiny setting."""

import datetime
import re

import numpy as np
import pytest

import tinytf.seq2seq as seq2seq
from tinytf.cli import UserError


@pytest.mark.parametrize("n, words, ordinal", [(1, "one", "first"), (2, "two", "second"), (5, "five", "fifth"),
                                               (12, "twelve", "twelfth"), (20, "twenty", "twentieth"),
                                               (21, "twenty-one", "twenty-first"), (23, "twenty-three", "twenty-third"),
                                               (30, "thirty", "thirtieth"), (31, "thirty-one", "thirty-first")])
def test_numbers_and_ordinals_in_words(n, words, ordinal):
    assert seq2seq.number_words(n) == words
    assert seq2seq.ordinal_words(n) == ordinal


@pytest.mark.parametrize("year, words", [(1987, "nineteen eighty-seven"), (1905, "nineteen oh-five"),
                                         (1900, "nineteen hundred"), (2000, "two thousand"),
                                         (2005, "two thousand five"), (2018, "twenty eighteen"),
                                         (2112, "twenty-one twelve")])
def test_years_in_words(year, words):
    assert seq2seq.year_words(year) == words


@pytest.mark.parametrize("n, text", [(1, "1st"), (2, "2nd"), (3, "3rd"), (4, "4th"), (11, "11th"), (12, "12th"),
                                     (13, "13th"), (21, "21st"), (22, "22nd"), (31, "31st")])
def test_ordinals_in_digits(n, text):
    assert seq2seq.ordinal_digits(n) == text


def test_every_style_writes_the_date_and_fits_the_model():
    date = datetime.date(1987, 3, 5)
    writings = [seq2seq.written(date, style) for style in range(seq2seq.STYLES)]
    assert len(set(writings)) == seq2seq.STYLES
    assert "thursday, march 5, 1987" in writings  # 5 March 1987 was a Thursday
    assert "the fifth of March, nineteen eighty-seven" in writings
    for ordinal in range(seq2seq.FIRST_DAY, seq2seq.LAST_DAY, 97):
        for style in range(seq2seq.STYLES):
            text = seq2seq.written(datetime.date.fromordinal(ordinal), style)
            assert len(text) <= seq2seq.MAX_SOURCE
            assert seq2seq.decode(seq2seq.encode(text)) == text


def test_held_out_dates_never_train():
    rng = np.random.default_rng(0)
    trained = {date.toordinal() for date in seq2seq.sample_dates(rng, 20_000, held_out=False)}
    held_out = {date.toordinal() for date in seq2seq.sample_dates(rng, 2_000, held_out=True)}
    assert not trained & held_out
    assert all(day % seq2seq.HELD_OUT_EVERY == 0 for day in held_out)
    sources, targets = seq2seq.batch(rng, 8)
    for source, target in zip(sources, targets):
        assert target[-1] == seq2seq.END and re.fullmatch(r"\d{4}-\d{2}-\d{2}", seq2seq.decode(target))


def test_train_then_translate_as_a_user_would(tmp_path, capsys):
    out = tmp_path / "dates"
    assert seq2seq.main(["train", "--out", str(out), "--iters", "20", "--d-model", "32", "--layers", "1",
                         "--eval-size", "20", "--log-interval", "10"]) == 0
    log = capsys.readouterr().out
    assert "step 20: loss" in log and re.search(r"held-out exact match: \d+\.\d+% of 20 dates", log)
    assert seq2seq.main(["translate", "--ckpt", str(out), "March 5, 1987", "the first of may, two thousand"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert seq2seq.main(["translate", "--ckpt", str(out), "--num-beams", "2", "March 5, 1987"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert seq2seq.main(["train", "--out", str(tmp_path / "full"), "--iters", "1"]) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert seq2seq.main(["translate", "--ckpt", str(tmp_path / "none"), "March 5"]) == 2
    assert capsys.readouterr().err.startswith("tinytf.seq2seq: error: --ckpt")
    with pytest.raises(UserError, match=r"\['ä'\] are not among them"):
        seq2seq.encode("5. März 1987")
