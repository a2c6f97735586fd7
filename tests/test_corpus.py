"""corpus.py: the tiny synthetic corpus has VoxCeleb's layout, sound trial lists, and is
deterministic and idempotent."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from rawnet_lib import corpus
from rawnet_lib.corpus import SIZES, ensure_demo_corpus, find_voices, generate_corpus
from rawnet_lib.dataset import synth
from rawnet_lib.dataset.trials import read_trials

needs_tools = pytest.mark.skipif(shutil.which("espeak-ng") is None or shutil.which("ffmpeg") is None,
                                 reason="needs espeak-ng and ffmpeg (./setup.sh install)")
LISTS = ["veri_test", "list_test_all", "list_test_hard"]


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    return generate_corpus(tmp_path_factory.mktemp("a"), "tiny", seed=0, workers=2, progress=False)


@pytest.fixture(scope="module")
def manifest(db: Path) -> dict:
    return json.loads((db / "corpus.json").read_text())


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "corpus.json"}


def _trials(db: Path, name: str) -> list[tuple[int, str, str]]:
    lines = (db / "VoxCeleb1" / name).read_text().splitlines()
    return [(int(label), a, b) for label, a, b in (line.split(" ") for line in lines)]


@needs_tools
def test_layout_and_names(db: Path, manifest: dict) -> None:
    speakers = {split: sorted(p.name for p in (db / folder).iterdir())
                for split, folder in corpus.SPLITS.items()}
    native = sum(v["text"] != "latin" for v in manifest["voices"])  # 1 where MBROLA has such voices
    assert native == min(1, sum(bool(v.syllables) for v in find_voices("auto")[0]))
    # tiny: 3x2, 2x2, (4 + native) x (1 + 1 extra speed)
    assert [len(speakers[s]) for s in corpus.SPLITS] == [6, 4, 8 + 2 * native]
    assert all(re.fullmatch(r"id0\d{4}", s) for s in speakers["vox2_train"])
    assert all(re.fullmatch(r"id1\d{4}", s) for s in speakers["vox1_dev"] + speakers["vox1_eval"])
    m4a = sorted((db / "VoxCeleb2" / "m4a").rglob("*.m4a"))
    wav = sorted((db / "VoxCeleb1").rglob("*.wav"))
    for path in m4a + wav:
        video, utt = path.parent.name, path.name
        assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]{10}", video)
        assert re.fullmatch(r"\d{5}\.(wav|m4a)", utt)
    assert len(m4a) == manifest["counts"]["vox2_train"]["utterances"]
    assert len(wav) == sum(manifest["counts"][s]["utterances"] for s in ("vox1_dev", "vox1_eval"))
    assert not list(db.rglob(".*.tmp")) and not (db / ".corpus_pending.json").exists()


@needs_tools
def test_splits_share_no_speaker_and_no_base_voice(db: Path, manifest: dict) -> None:
    by_split = {s: {r["voice"] for r in manifest["speakers"] if r["split"] == s} for s in corpus.SPLITS}
    assert not by_split["vox2_train"] & by_split["vox1_dev"]
    assert not by_split["vox2_train"] & by_split["vox1_eval"]
    assert not by_split["vox1_dev"] & by_split["vox1_eval"]
    on_disk = {p.name for folder in corpus.SPLITS.values() for p in (db / folder).iterdir()}
    assert on_disk == {r["id"] for r in manifest["speakers"]}  # ids unique across all splits
    eval_genders = {r["gender"] for r in manifest["speakers"] if r["split"] == "vox1_eval"}
    assert eval_genders == {"f", "m"}


@needs_tools
def test_audio_is_16k_mono_pcm16_of_varied_length(db: Path) -> None:
    infos = [sf.info(str(p)) for p in sorted((db / "VoxCeleb1").rglob("*.wav"))]
    assert {(i.samplerate, i.channels, i.subtype) for i in infos} == {(16000, 1, "PCM_16")}
    durations = sorted(i.duration for i in infos)
    assert 1.0 < durations[0] and durations[-1] < 5.0 and durations[-1] - durations[0] > 1.0


@needs_tools
def test_trial_lists_are_sound(db: Path, manifest: dict) -> None:
    info = {r["id"]: r for r in manifest["speakers"]}
    for name in LISTS:
        trials = _trials(db, f"{name}.txt")
        targets = [t for t in trials if t[0] == 1]
        assert {t[0] for t in trials} == {0, 1} and abs(2 * len(targets) - len(trials)) <= 4
        for label, a, b in trials:
            spk_a, spk_b = a.split("/")[0], b.split("/")[0]
            assert (spk_a == spk_b) == (label == 1)
            if label == 1:
                assert a.split("/")[1] != b.split("/")[1]  # tiny has 2 videos per speaker
            for path in (a, b):
                folders = ["eval_wav"] if name == "veri_test" else ["eval_wav", "dev_wav"]
                assert any((db / "VoxCeleb1" / f / path).is_file() for f in folders)
            if name == "list_test_hard" and label == 0:
                assert info[spk_a]["gender"] == info[spk_b]["gender"]
        cleaned = _trials(db, f"{name}2.txt")
        assert set(cleaned) < set(trials) and len(cleaned) >= len(trials) - 2
        pairs = [frozenset((a, b)) for _, a, b in trials]
        assert len(set(pairs)) == len(pairs), "no pair twice, in either order"
        for listed in (f"{name}.txt", f"{name}2.txt"):
            read_trials(db / "VoxCeleb1" / listed)  # the workbook's own parser accepts it
    assert manifest["counts"]["trials"]["veri_test.txt"] == len(_trials(db, "veri_test.txt"))


@needs_tools
def test_manifest_describes_the_corpus(db: Path, manifest: dict) -> None:
    assert (manifest["size"], manifest["seed"], manifest["voices_requested"]) == ("tiny", 0, "auto")
    assert manifest["voice_kind"] in ("mbrola", "espeak") and manifest["generation_seconds"] > 0
    assert {v["split"] for v in manifest["voices"]} == set(corpus.SPLITS)
    assert all(v["gender"] in "mf" and v["family"] and v["kind"] == manifest["voice_kind"]
               for v in manifest["voices"])
    native = [v for v in manifest["voices"] if v["text"] != "latin"]
    assert len(manifest["voices"]) == sum(SIZES["tiny"].voices) + len(native)
    assert all(v["split"] == "vox1_eval" for v in native)
    eval_seconds = sum(sf.info(str(p)).duration for p in (db / "VoxCeleb1" / "eval_wav").rglob("*.wav"))
    assert manifest["seconds_of_audio"]["vox1_eval"] == pytest.approx(eval_seconds, abs=0.2)
    train = manifest["counts"]["vox2_train"]
    assert (train["speakers"], train["videos"]) == (6, 12) and 24 <= train["utterances"] <= 36
    assert sum(r["utterances"] for r in manifest["speakers"]) == sum(
        manifest["counts"][s]["utterances"] for s in corpus.SPLITS)


@pytest.mark.slow
@needs_tools
def test_same_seed_gives_identical_bytes_whatever_the_workers(db: Path, tmp_path: Path) -> None:
    again = generate_corpus(tmp_path, "tiny", seed=0, workers=1, progress=False)
    first, second = _files(db), _files(again)
    assert first.keys() == second.keys() and first == second


@pytest.mark.slow
@needs_tools
def test_other_seed_gives_other_corpus(db: Path, tmp_path: Path) -> None:
    other = generate_corpus(tmp_path, "tiny", seed=1, workers=2, progress=False)
    name = "VoxCeleb1/veri_test.txt"
    assert (db / name).read_text() != (other / name).read_text()
    assert {p.name for p in (db / "VoxCeleb1" / "eval_wav").iterdir()} != \
        {p.name for p in (other / "VoxCeleb1" / "eval_wav").iterdir()}


@needs_tools
def test_second_call_generates_nothing_and_other_settings_raise(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rawnet_lib import corpus

    def no_generation(*args, **kwargs):
        raise AssertionError("a finished corpus of the same size and seed was generated again")
    monkeypatch.setattr(corpus, "find_voices", no_generation)  # the first step of a generation
    stamp = (db / "corpus.json").stat().st_mtime_ns
    assert generate_corpus(db.parent, "tiny", seed=0, progress=False) == db
    assert (db / "corpus.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="seed=0.*pick another root or delete"):
        generate_corpus(db.parent, "tiny", seed=7, progress=False)
    with pytest.raises(ValueError, match="size='tiny'"):
        generate_corpus(db.parent, "demo", seed=0, progress=False)


@needs_tools
@pytest.mark.parametrize("version, before", [(1, {"eval_extra": (), "eval_native": 0}), (2, {"eval_native": 0})])
def test_an_older_version_upgrades_by_adding_speakers(db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      version: int, before: dict) -> None:
    """Version 1 had neither the extra test speeds (2) nor the test voices that speak their own
    syllables (3): an older corpus's speakers keep their bytes in the current one, so models
    trained on it stay valid, and upgrading it in place gives the same files as a new corpus."""
    with monkeypatch.context() as m:
        m.setattr(corpus, "VERSION", version)
        m.setitem(SIZES, "tiny", dataclasses.replace(SIZES["tiny"], **before))
        old = generate_corpus(tmp_path, "tiny", seed=0, workers=1, progress=False)
    v1 = _files(old)
    manifest = json.loads((old / "corpus.json").read_text())
    assert manifest["version"] == version
    other = json.loads(json.dumps(manifest))
    other["speakers"][0]["voice"] = "mb-xx9"  # made with voices this machine no longer has
    (old / "corpus.json").write_text(json.dumps(other))
    with pytest.raises(corpus.CorpusError, match="other voices.*delete that folder"):
        generate_corpus(tmp_path, "tiny", seed=0, workers=1, progress=False)
    assert not (old / ".corpus_pending.json").exists()  # refused before anything was written
    (old / "corpus.json").write_text(json.dumps(manifest))
    upgraded = generate_corpus(tmp_path, "tiny", seed=0, workers=1, progress=False)
    new = _files(upgraded)
    assert all(new[k] == v for k, v in v1.items() if "/veri_test" not in k and "/list_test" not in k)
    assert new == _files(db)  # the upgrade is the current corpus, trial lists included
    manifest = json.loads((upgraded / "corpus.json").read_text())
    assert manifest["version"] == corpus.VERSION
    assert manifest["counts"]["vox1_eval"]["speakers"] == json.loads((db / "corpus.json").read_text())[
        "counts"]["vox1_eval"]["speakers"] > 4


@needs_tools
def test_base_voices_group_the_speed_variants_of_a_voice(db: Path, manifest: dict, tmp_path: Path) -> None:
    voices = corpus.base_voices(db)
    test = [row for row in manifest["speakers"] if row["split"] == "vox1_eval"]
    assert {voices[row["id"]] for row in test} == {row["voice"] for row in test}
    assert len(test) == 2 * len({row["voice"] for row in test})  # tiny: each test voice at 1.0 and 1.1
    assert corpus.base_voices(tmp_path) == {} and corpus.base_voices("") == {}  # other data: speakers


@needs_tools
def test_ensure_demo_corpus_converts_the_m4a(db: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(db.parent, root)
    out = ensure_demo_corpus("tiny", root=root)
    m4a = sorted(p.relative_to(out / "VoxCeleb2" / "m4a").with_suffix("")
                 for p in (out / "VoxCeleb2" / "m4a").rglob("*.m4a"))
    wav = sorted(p.relative_to(out / "VoxCeleb2" / "wav").with_suffix("")
                 for p in (out / "VoxCeleb2" / "wav").rglob("*.wav"))
    assert out == root / "DB" and m4a == wav and len(wav) > 0


@needs_tools
def test_voices_of_other_scripts_speak_their_own_syllables_without_a_missing_diphone() -> None:
    """An MBROLA voice whose language does not read Latin text (Japanese, Arabic, ...) is kept with
    the syllables of its own script it speaks; random sentences of them lose no diphone."""
    usable = find_voices("auto")[0]
    native = [v for v in usable if v.syllables]
    if not native:
        pytest.skip("no MBROLA voice of another script installed")
    for voice in native:
        assert len(voice.syllables) >= synth._MIN_SYLLABLES and voice.words_per_s > 1
        text = synth._sentence(np.random.default_rng(1), 20, voice.syllables)  # not the probe's sentence
        assert set(text.replace(",", "").replace(" ", "")) <= set("".join(voice.syllables))
        assert synth._spoken(voice, text) is not None
    assert all(not v.syllables for v in usable if v.family in ("en", "de", "fr"))


@needs_tools
def test_espeak_missing_is_explained(monkeypatch) -> None:
    monkeypatch.setattr(synth.shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="apt-get install espeak-ng"):
        find_voices.__wrapped__("auto")


def test_bad_arguments_raise(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(ValueError, match="size='huge'.*demo"):
        generate_corpus(tmp_path, "huge")
    with pytest.raises(ValueError, match="voices='festival'"):
        find_voices.__wrapped__("festival")
    (tmp_path / "DB").mkdir()
    (tmp_path / "DB" / "something").write_text("not ours")
    with pytest.raises(ValueError, match="not made by generate_corpus"):
        generate_corpus(tmp_path, "tiny")
    monkeypatch.setenv("RAWNET_DEMO_ROOT", str(tmp_path / "elsewhere"))
    assert corpus._default_root("tiny") == tmp_path / "elsewhere" / "tiny"
