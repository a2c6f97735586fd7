"""Tests for rawnet_lib.dataset.trials: parsing with every problem reported, disk checks, writing, making lists."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rawnet_lib.dataset.trials import (OFFICIAL_LISTS, TrialList, TrialListError, TrialListWarning, make_trials,
                                       official_list_path, read_trials, resolve, write_trials)


def _write(tmp_path: Path, text: str, name: str = "list.txt") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _keys(n_spk: int, n_vid: int, n_utt: int) -> list[str]:
    return [f"id{s:03d}/v{v}/{u:05d}.wav" for s in range(n_spk) for v in range(n_vid) for u in range(n_utt)]


def test_read_roundtrip(tmp_path):
    path = _write(tmp_path, "1 a/v1/1.wav a/v2/1.wav\n0 a/v1/1.wav b/v1/1.wav\r\n\n  1\tb/v1/1.wav  b/v1/2.wav  \n")
    trials = read_trials(path)
    assert trials.labels.dtype == np.int8
    assert trials.labels.tolist() == [1, 0, 1]
    assert trials.enroll == ["a/v1/1.wav", "a/v1/1.wav", "b/v1/1.wav"]
    assert trials.test == ["a/v2/1.wav", "b/v1/1.wav", "b/v1/2.wav"]
    assert trials.files() == ["a/v1/1.wav", "a/v2/1.wav", "b/v1/1.wav", "b/v1/2.wav"]
    assert trials.speakers() == ["a", "b"]
    assert len(trials) == 3 and trials.path == path
    out = tmp_path / "out" / "copy.txt"
    write_trials(out, trials)
    again = read_trials(out)
    assert again.labels.tolist() == trials.labels.tolist() and again.enroll == trials.enroll
    assert again.test == trials.test


def test_every_problem_reported_with_line_numbers(tmp_path):
    text = "\n".join([
        "1 a/v/1.wav a/v/2.wav",          # 1 fine
        "1 a/v/1.wav",                    # 2 too few fields
        "target a/v/3.wav a/v/4.wav",     # 3 bad label
        "1 a/v/2.wav a/v/1.wav",          # 4 duplicate of 1, reversed
        "1 a/v/1.wav a/v/2.wav",          # 5 duplicate of 1, same order
        "1 a/v/5.wav b/v/5.wav",          # 6 target across speakers
        "0 c/v/1.wav c/w/2.wav",          # 7 non-target of one speaker
        "1 a/v/1.wav a/v/2.wav extra",    # 8 too many fields
        "0.7 a/v/6.wav b/v/6.wav",        # 9 bad label
        "1 d/v/1.wav d/v/1.wav",          # 10 same file twice
    ]) + "\n"
    path = _write(tmp_path, text)
    with pytest.raises(TrialListError) as info:
        read_trials(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "wrong field count: 2 line(s)" in msg
    assert "line 2: '1 a/v/1.wav'" in msg and "line 8:" in msg
    assert "label not 0/1: 2 line(s)" in msg and "line 3:" in msg and "line 9:" in msg
    assert "duplicate trial: 2 line(s)" in msg
    assert "line 4: '1 a/v/2.wav a/v/1.wav' (repeats line 1)" in msg
    assert "line 5: '1 a/v/1.wav a/v/2.wav' (repeats line 1)" in msg
    assert "label disagrees with speaker ids: 2 line(s)" in msg and "line 6:" in msg and "line 7:" in msg
    assert "same file on both sides: 1 line(s)" in msg and "line 10:" in msg
    assert "`label enroll test`" in msg and "label 1 = same speaker" in msg


def test_only_first_lines_are_quoted(tmp_path):
    path = _write(tmp_path, "".join(f"x a/v/{i}.wav b/v/{i}.wav\n" for i in range(50)))
    with pytest.raises(TrialListError) as info:
        read_trials(path)
    msg = str(info.value)
    assert "label not 0/1: 50 line(s)" in msg
    assert "line 5:" in msg and "line 6:" not in msg


def test_non_ascii_whitespace_lines_keep_their_numbers(tmp_path):
    # U+00A0 splits like a space in str.split(), so the per-line fallback must count fields.
    path = _write(tmp_path, "1\u00a0a/v/1.wav a/v/2.wav\n0 a/v/1.wav\n0 a/v/ü 1.wav b/v/1.wav\n")
    with pytest.raises(TrialListError) as info:
        read_trials(path)
    msg = str(info.value)
    assert "wrong field count: 2 line(s)" in msg
    assert "line 2:" in msg and "line 3:" in msg and "line 1:" not in msg


@pytest.mark.parametrize("content, expect", [
    (b"", "empty list"),
    (b"\n \n\t\n", "empty list"),
    (b"\xff\xfe1\x00 \x00a\x00\n\x00", "UTF-16 text .*byte order mark FF FE.*iconv -f UTF-16 -t UTF-8"),
    (b"\xfe\xff\x001\x00 \x00a\x00\n", "UTF-16 text .*byte order mark FE FF"),
    (b"1 a/v/1.wav a/v/2.wav\n0 a/v/1.wav b/v/caf\xe9.wav\n",  # latin1
     r"not UTF-8 text: line 2: '0 a/v/1.wav b/v/caf\\\\xe9.wav' \(invalid continuation byte\); save it as UTF-8"),
    (b"1 a/v/1.wav\x00 a/v/2.wav\n", "binary"),
])
def test_unusable_files(tmp_path, content, expect):
    path = tmp_path / "bad list.txt"
    path.write_bytes(content)
    with pytest.raises(TrialListError, match=expect) as info:
        read_trials(path)
    assert str(path) in str(info.value)


def test_list_of_only_bad_lines_is_not_called_empty(tmp_path):
    with pytest.raises(TrialListError, match="wrong field count: 2 line") as info:
        read_trials(_write(tmp_path, "a/v/1.wav a/v/2.wav\nfoo\n"))
    assert "empty list" not in str(info.value)


def test_missing_list_names_file_and_fix(tmp_path):
    with pytest.raises(TrialListError, match="not found") as info:
        read_trials(tmp_path / "nope.txt")
    assert "nope.txt" in str(info.value) and "VoxCeleb1" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_official_list_path(tmp_path):
    assert official_list_path(tmp_path, "O") == tmp_path / "VoxCeleb1" / "veri_test.txt"
    assert official_list_path(tmp_path, "H2") == tmp_path / "VoxCeleb1" / "list_test_hard2.txt"
    assert official_list_path(tmp_path, "/x/my list.txt") == Path("/x/my list.txt")
    assert set(OFFICIAL_LISTS) == {"O", "O2", "E", "E2", "H", "H2"}
    with pytest.raises(ValueError, match="O, O2, E, E2, H, H2"):
        official_list_path(tmp_path, "Vox1-O")


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def test_resolve_finds_a_key_in_the_first_root_that_holds_it(tmp_path):
    dev, ev = tmp_path / "dev wav", tmp_path / "eval_wäv"
    _touch(dev / "a/v/1.wav")
    _touch(ev / "a/v/1.wav")
    _touch(ev / "b/v/1.wav")
    assert resolve("a/v/1.wav", [dev, ev]) == dev / "a/v/1.wav"  # first root wins
    assert resolve("b/v/1.wav", [dev, ev]) == ev / "b/v/1.wav"
    with pytest.raises(FileNotFoundError, match="c/v/1.wav"):
        resolve("c/v/1.wav", [dev, ev])


def test_files_not_on_disk_are_listed_by_line_with_the_other_problems(tmp_path):
    dev, ev = tmp_path / "dev wav", tmp_path / "eval_wäv"
    for key in ("a/v/1.wav", "a/w/2.wav", "b/v/1.wav"):
        _touch((dev if key.startswith("a") else ev) / key)
    path = _write(tmp_path, "1 a/v/1.wav a/w/2.wav\n"     # 1 fine, across videos
                            "0 a/v/1.wav c/v/1.wav\n"     # 2 c missing
                            "1 a/v/1.wav\n"               # 3 too few fields
                            "0 d/v/9.wav c/v/1.wav\n"     # 4 both missing
                            "yes a/w/2.wav b/v/1.wav\n")  # 5 bad label, files present
    assert read_trials(_write(tmp_path, "0 a/v/1.wav b/v/1.wav\n1 a/v/1.wav a/w/2.wav\n", "ok.txt"),
                       [dev, ev]).files() == ["a/v/1.wav", "a/w/2.wav", "b/v/1.wav"]
    with pytest.raises(TrialListError, match=r"one\.txt is not usable .*\n  one class only\n    fix: EER, minDCF"):
        read_trials(_write(tmp_path, "0 a/v/1.wav b/v/1.wav\n", "one.txt"))
    with pytest.raises(TrialListError) as info:
        read_trials(path, [dev, ev])
    msg = str(info.value)
    assert "wrong field count: 1 line(s)" in msg and "label not 0/1: 1 line(s)" in msg
    assert "file not on disk: 2 line(s)" in msg
    assert "line 2: '0 a/v/1.wav c/v/1.wav' (c/v/1.wav not found)" in msg
    assert "line 4: '0 d/v/9.wav c/v/1.wav' (d/v/9.wav and c/v/1.wav not found)" in msg
    assert "dev_wav and eval_wav" in msg  # the fix
    with pytest.raises(TrialListError) as info:
        read_trials(path)  # without roots the disk is not asked
    assert "not on disk" not in str(info.value)


def test_a_byte_order_mark_is_stripped_with_a_warning(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbf1 a/v/1.wav a/w/2.wav\r\n0 a/v/1.wav b/v/1.wav\r\n")
    with pytest.warns(TrialListWarning, match="byte order mark") as caught:
        trials = read_trials(path)
    assert str(path) in str(caught[0].message)
    assert trials.labels.tolist() == [1, 0] and trials.enroll == ["a/v/1.wav", "a/v/1.wav"]
    path.write_bytes(b"\xef\xbb\xbfx a/v/1.wav a/w/2.wav\n")  # a real label problem is still one, on line 1
    with pytest.warns(TrialListWarning), pytest.raises(TrialListError, match="line 1: 'x a/v/1.wav"):
        read_trials(path)


def test_write_rejects_keys_with_spaces(tmp_path):
    trials = TrialList(np.array([1], np.int8), ["a/v/1 copy.wav"], ["a/v/2.wav"])
    with pytest.raises(ValueError, match="1 copy.wav"):
        write_trials(tmp_path / "t.txt", trials)
    assert not (tmp_path / "t.txt").exists()


def test_make_trials_properties(tmp_path):
    keys = _keys(6, 3, 4)
    trials = make_trials(keys, 400, seed=3)
    assert len(trials) == 400 and int(trials.labels.sum()) == 200
    spk_e = [k.split("/")[0] for k in trials.enroll]
    spk_t = [k.split("/")[0] for k in trials.test]
    same = np.array([a == b for a, b in zip(spk_e, spk_t)])
    assert np.array_equal(same, trials.labels == 1)
    # 6 speakers x 3 videos x C(4,2)... cross-video pairs per speaker = 66 - 18 = 48, so 288 >= 200: all cross-video
    vid = lambda k: tuple(k.split("/")[:2])  # noqa: E731
    assert all(vid(a) != vid(b) for a, b, y in zip(trials.enroll, trials.test, trials.labels) if y)
    pairs = {frozenset(p) for p in zip(trials.enroll, trials.test)}
    assert len(pairs) == 400 and all(len(p) == 2 for p in pairs)
    assert set(trials.files()) <= set(keys)
    assert trials.labels[:50].sum() not in (0, 50)  # shuffled, not all targets first
    again = make_trials(list(reversed(keys)), 400, seed=3)  # input order does not matter
    assert again.enroll == trials.enroll and again.test == trials.test
    other = make_trials(keys, 400, seed=4)
    assert other.enroll != trials.enroll
    path = tmp_path / "val_trial.txt"
    write_trials(path, trials)
    assert read_trials(path).enroll == trials.enroll  # a made list passes every read check


def test_make_trials_uses_same_video_only_when_needed_and_caps():
    keys = ["a/v1/1.wav", "a/v1/2.wav", "a/v2/1.wav", "b/v1/1.wav", "b/v1/2.wav", "c/v1/1.wav"]
    # targets: 2 cross-video (a) + 2 same-video (a/v1, b/v1) = 4; non-targets: C(6,2) - 4 = 11
    trials = make_trials(keys, 9, seed=0)  # the maximum: 4 targets, 5 non-targets
    assert int(trials.labels.sum()) == 4 and len(trials) == 9
    targets = {frozenset(p) for p, y in zip(zip(trials.enroll, trials.test), trials.labels) if y}
    assert targets == {frozenset(p) for p in [("a/v1/1.wav", "a/v2/1.wav"), ("a/v1/2.wav", "a/v2/1.wav"),
                                              ("a/v1/1.wav", "a/v1/2.wav"), ("b/v1/1.wav", "b/v1/2.wav")]}
    two = make_trials(keys, 4, seed=0)
    assert all(a.split("/")[1] != b.split("/")[1]
               for a, b, y in zip(two.enroll, two.test, two.labels) if y)  # 2 targets: both cross-video
    with pytest.raises(ValueError, match="2 to 9"):
        make_trials(keys, 10, seed=0)
    with pytest.raises(ValueError, match="n_pairs=1, .* give 2 to 9"):  # one pair: one class, no EER
        make_trials(keys, 1, seed=0)


@pytest.mark.parametrize("keys, match", [
    (["a/v/1.wav", "a/v/2.wav"], "2 speakers"),
    (["a/v/1.wav", "b/v/1.wav", "c/w/1.wav"], "2 utterances"),
    (["a/1.wav", "b/v/1.wav"], "spk/video/utt.wav"),
])
def test_make_trials_rejects_unusable_keys(keys, match):
    with pytest.raises(ValueError, match=match):
        make_trials(keys, 2, seed=0)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
@pytest.mark.filterwarnings("ignore::rawnet_lib.dataset.trials.TrialListWarning")  # a leading BOM is legal input
def test_random_bytes_give_trials_or_trial_list_error(tmp_path, data):
    path = tmp_path / "fuzz.txt"
    path.write_bytes(data)
    try:
        trials = read_trials(path)
    except TrialListError as err:
        assert str(path) in str(err)
    else:
        assert len(trials) == len(trials.enroll) == len(trials.test) > 0
        assert set(trials.labels.tolist()) <= {0, 1}


_token = st.sampled_from(["0", "1", "2", "a/v/1.wav", "a/w/2.wav", "b/v/1.wav", "x", "\u00a0", "ü/v/1.wav"])
_line = st.lists(_token, max_size=5).map(" ".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(_line, st.text(max_size=30)), max_size=12))
def test_random_text_gives_trials_or_trial_list_error(tmp_path, lines):
    path = tmp_path / "fuzz.txt"
    path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    try:
        trials = read_trials(path)
    except TrialListError as err:
        assert str(path) in str(err)
    else:  # a clean parse must agree with a plain line-by-line reading
        rows = [line.split() for line in path.read_text(encoding="utf-8").split("\n") if line.split()]
        assert trials.labels.tolist() == [int(r[0]) for r in rows]
        assert trials.enroll == [r[1] for r in rows] and trials.test == [r[2] for r in rows]


def test_read_e_sized_list(tmp_path):
    n_keys, n = 1500, 580_000
    keys = [f"id{i % 300:05d}/vid{i // 300}/{i:05d}.wav" for i in range(n_keys)]
    rng = np.random.default_rng(0)
    flat = rng.choice(n_keys * (n_keys - 1) // 2, n, replace=False)
    i, j = np.triu_indices(n_keys, 1)
    i, j = i[flat], j[flat]
    labels = (i % 300 == j % 300).astype(int)
    path = tmp_path / "list_test_all.txt"
    path.write_text("".join(f"{y} {keys[a]} {keys[b]}\n" for y, a, b in zip(labels, i, j)))
    trials = read_trials(path)
    assert len(trials) == n
    assert int(trials.labels.sum()) == int(labels.sum())
    assert trials.enroll[123_456] == keys[i[123_456]] and trials.test[-1] == keys[j[-1]]
