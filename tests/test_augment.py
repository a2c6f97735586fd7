"""Issue 12: augmentation (deterministic per seed, epoch and index; SNR inside its range),
speed perturbation (labels and pitch), the built-in sets and folders without audio."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import rawnet_lib.dataset.augment as augment_mod
from rawnet_lib.config import AugmentConfig
from rawnet_lib.dataset.augment import (Augmenter, AugmentError, builtin_babble, ensure_builtin_sets, find_noises,
                                        find_rirs)
from rawnet_lib.dataset.utterances import CropDataset, perturbed_speakers, scan_utterances, speed_crop

SR = 16000


def _wav(path: Path, x: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), x.astype(np.float32), SR, subtype="FLOAT")
    return path


@pytest.fixture
def sets(tmp_path: Path) -> tuple[Path, Path]:
    """A MUSAN-layout noise folder (white noise, a chord, 4 talkers) and an RIRS_NOISES-layout RIR."""
    rng = np.random.default_rng(0)
    t = np.arange(2 * SR) / SR
    musan, rirs = tmp_path / "musan", tmp_path / "RIRS_NOISES"
    _wav(musan / "noise" / "free-sound" / "white.wav", rng.standard_normal(2 * SR) * 0.1)
    _wav(musan / "music" / "synth" / "chord.wav", np.sin(2 * np.pi * 330 * t) + np.sin(2 * np.pi * 440 * t))
    for i in range(4):
        _wav(musan / "speech" / "talk" / f"s{i}.wav", np.sin(2 * np.pi * (150 + 40 * i) * t) * rng.uniform(0.1, 1))
    decay = np.exp(-np.arange(2000) / 300.0) * rng.standard_normal(2000)
    decay[:50] = 0
    decay[50] = 5.0  # direct path after 50 samples
    _wav(rirs / "simulated_rirs" / "smallroom" / "Room001" / "Room001-00001.wav", decay)
    _wav(rirs / "real_rirs_isotropic_noises" / "noise.wav", rng.standard_normal(SR))  # not an RIR: left out
    return musan, rirs


def _augmenter(sets, **kw) -> Augmenter:
    musan, rirs = sets
    cfg = AugmentConfig(enabled=True, noise_dir=str(musan), rir_dir=str(rirs), **kw)
    return Augmenter.from_config(cfg)


def test_layouts_are_found(sets):
    musan, rirs = sets
    assert sorted(find_noises(musan)) == ["music", "noise", "speech"]
    assert [p.name for p in find_rirs(rirs)] == ["Room001-00001.wav"]


def test_measured_snr_is_inside_each_kinds_range(sets, monkeypatch):
    """Noise and music at an SNR of their kind's range; babble's talkers each at one of its range, summed."""
    aug = _augmenter(sets, noise_prob=1.0, rir_prob=0.5)
    x = np.sin(2 * np.pi * 200 * np.arange(8000) / SR).astype(np.float32)
    parts, real = [], augment_mod.add_noise
    monkeypatch.setattr(augment_mod, "add_noise", lambda x, noise, snr: parts.append(real(x, noise, snr)) or parts[-1])

    def snr_of(noise: np.ndarray, speech: np.ndarray) -> float:
        return float(10 * np.log10(np.mean(speech.astype(float) ** 2) / np.mean(noise.astype(float) ** 2)))
    seen = set()
    # float32 signals: a measured power ratio is exact to a few float32 eps, i.e. ~1e-5 dB
    tol = float(10 * np.log10(1 + 64 * np.finfo(np.float32).eps))
    for i in range(60):
        parts.clear()
        m = aug.mix(x, np.random.default_rng([7, 1, i]))
        low, high = aug.snr[m.kind]
        # babble: the talkers' parts summed, then rounded once to float32 (half an ulp: 2**-24 relative)
        np.testing.assert_allclose(m.noise, sum(parts), rtol=2.0 ** -24, atol=0)
        talkers = [snr_of(part, m.speech) for part in parts]
        assert all(low - tol <= t <= high + tol for t in talkers), (m.kind, talkers)
        low_k, high_k = aug.cfg.babble_files if m.kind == "speech" else (1, 1)
        assert low_k <= len(talkers) <= min(high_k, len(aug.noises[m.kind]))
        seen.add(m.kind)
    assert seen == {"noise", "music", "speech"}


def test_reverb_keeps_the_crop_aligned(sets):
    aug = _augmenter(sets, noise_prob=0.0, rir_prob=1.0)
    x = np.zeros(4000, np.float32)
    x[1000] = 1.0
    m = aug.mix(x, np.random.default_rng(0))
    assert m.reverb and int(np.argmax(np.abs(m.speech))) == 1000 and np.all(m.noise == 0)


def _tree(root: Path) -> Path:
    t = np.arange(SR) / SR
    for s, f0 in enumerate((300, 500, 700)):
        for u in range(2):
            _wav(root / f"id{s:05d}" / "vid" / f"{u}.wav", np.sin(2 * np.pi * f0 * t) * (0.5 + 0.1 * u))
    return root


def test_augmented_crops_are_deterministic_per_seed_epoch_index(sets, tmp_path):
    utts = scan_utterances(_tree(tmp_path / "tree"), progress=False)
    aug = _augmenter(sets)
    plain = CropDataset(utts, 4000, seed=3)
    ds = CropDataset(utts, 4000, seed=3, augment=aug)
    again = CropDataset(utts, 4000, seed=3, augment=_augmenter(sets))
    ds.set_epoch(2)
    again.set_epoch(2)
    for i in range(len(ds)):
        assert np.array_equal(ds[i][0].numpy(), again[i][0].numpy())
    changed = [not np.array_equal(ds[i][0].numpy(), (plain.set_epoch(2), plain[i][0].numpy())[1])
               for i in range(len(ds))]
    assert any(changed)
    before = ds[0][0].numpy()
    ds.set_epoch(3)
    assert not np.array_equal(before, ds[0][0].numpy())


def test_speed_perturbed_labels_and_pitch(tmp_path):
    root = _tree(tmp_path / "tree")
    utts = scan_utterances(root, progress=False)
    factors = [0.9, 1.0, 1.1]
    ds = CropDataset(utts, 4000, seed=1, speed_perturb=factors)
    assert ds.speakers() == perturbed_speakers(utts.speakers(), factors)
    assert ds.speakers()[:4] == ["id00000@sp0.9", "id00001@sp0.9", "id00002@sp0.9", "id00000"]
    labels = utts.labels()
    seen = set()
    bins = np.fft.rfftfreq(4000, 1 / SR)
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            x, label = ds[i]
            k, speaker = divmod(label, 3)
            assert speaker == labels[i] and len(x) == 4000
            # the label's factor is the one the audio was played at: speaker s's tone moves to f0 x factor
            peak = bins[np.argmax(np.abs(np.fft.rfft(np.asarray(x))))]
            assert abs(peak - (300, 500, 700)[speaker] * factors[k]) <= SR / 4000, (epoch, i, label)
            seen.add(k)
    assert seen == {0, 1, 2}
    # a 500 Hz tone played 1.1 times faster peaks at 550 Hz (the FFT bin is 4 Hz wide)
    y = speed_crop(root / "id00001" / "vid" / "0.wav", 4000, 1.1, np.random.default_rng(0))
    peak = np.fft.rfftfreq(4000, 1 / SR)[np.argmax(np.abs(np.fft.rfft(y)))]
    assert abs(peak - 550) <= SR / 4000


def test_folders_without_audio_are_refused(tmp_path):
    (tmp_path / "musan" / "noise").mkdir(parents=True)
    with pytest.raises(AugmentError, match=r"noise_dir .*musan has no \.wav files .*noise/, music/, speech/"):
        Augmenter.from_config(AugmentConfig(enabled=True, noise_dir=str(tmp_path / "musan"),
                                            rir_dir=str(tmp_path)))
    with pytest.raises(AugmentError, match="rir_dir .* has no .wav impulse responses"):
        find_rirs(tmp_path / "empty")
    assert Augmenter.from_config(AugmentConfig(enabled=False)) is None


def test_a_noise_or_rir_file_it_cannot_use_stops_before_training(sets):
    musan, rirs = sets
    slow = musan / "noise" / "free-sound" / "slow.wav"
    sf.write(str(slow), np.zeros(800, np.float32), 8000)
    with pytest.raises(AugmentError, match=r"slow\.wav: sample rate 8000 Hz, expected 16000; resample it to 16000 Hz "
                                           r"\(sox in\.wav -r 16000 out\.wav\) .* from the noise set \(noise/\)"):
        _augmenter(sets)
    slow.unlink()
    empty = rirs / "simulated_rirs" / "smallroom" / "Room002" / "Room002-00001.wav"
    empty.parent.mkdir(parents=True)
    empty.write_bytes(b"")
    with pytest.raises(AugmentError, match=r"Room002-00001\.wav: empty file .* remove it from the RIR set"):
        _augmenter(sets)


def test_silent_noise_or_rir_adds_nothing_and_says_so(tmp_path):
    silent = _wav(tmp_path / "musan" / "noise" / "quiet" / "zeros.wav", np.zeros(SR))
    _wav(tmp_path / "rirs" / "zero.wav", np.zeros(100))
    cfg = AugmentConfig(enabled=True, noise_dir=str(silent.parents[2]), rir_dir=str(tmp_path / "rirs"),
                        noise_prob=1.0, rir_prob=1.0)
    x = np.sin(2 * np.pi * 200 * np.arange(4000) / SR).astype(np.float32)
    m = Augmenter.from_config(cfg).mix(x, np.random.default_rng(0))
    assert m.kind == "" and np.isnan(m.snr_db) and not m.noise.any() and np.array_equal(m.speech, x)


def test_builtin_sets_are_made_once(tmp_path):
    noise, rirs = ensure_builtin_sets(tmp_path / "sets")
    kinds = find_noises(noise)
    assert sorted(kinds) == ["music", "noise"] and len(kinds["noise"]) == 12
    files = find_rirs(rirs)
    assert len(files) == 24 and {p.parent.parent.name for p in files} == {"smallroom", "mediumroom", "largeroom"}
    stamp = files[0].stat().st_mtime_ns
    assert ensure_builtin_sets(tmp_path / "sets") == (noise, rirs) and files[0].stat().st_mtime_ns == stamp
    utts = scan_utterances(_tree(tmp_path / "wav"), progress=False)
    babble = builtin_babble(utts, seed=1, n=4)  # training speech, a fixed sample per seed
    assert babble == builtin_babble(utts, seed=1, n=4) and len(set(babble)) == 4
    assert {p.relative_to(utts.root).as_posix() for p in babble} <= set(utts.keys)
    aug = Augmenter.from_config(AugmentConfig(enabled=True, sets_dir=str(tmp_path / "sets")), babble=babble)
    assert sorted(aug.noises) == ["music", "noise", "speech"] and aug.noises["speech"] == babble


@pytest.mark.parametrize("bad", ["noise", "rir"])
def test_nan_samples_in_a_noise_or_rir_file_raise_naming_it(sets, bad):
    """Headers cannot show NaN, so the file passes the start-up check and is caught where it is read."""
    musan, rirs = sets
    x = np.full(SR, 0.1)
    x[::7] = np.nan
    path = _wav(musan / "noise" / "free-sound" / "white.wav" if bad == "noise"
                else rirs / "simulated_rirs" / "smallroom" / "Room001" / "Room001-00001.wav", x)
    aug = _augmenter(sets, noise_prob=1.0 if bad == "noise" else 0.0, rir_prob=1.0 if bad == "rir" else 0.0)
    aug.noises = {"noise": aug.noises["noise"]}  # the one noise kind, so the bad file is drawn
    augment_mod._rir.cache_clear()
    crop = np.sin(2 * np.pi * 200 * np.arange(4000) / SR).astype(np.float32)
    with pytest.raises(AugmentError, match=rf"{path.name}: NaN or Inf samples; remove that file from the "
                                           rf"{'noise' if bad == 'noise' else 'RIR'} set, or replace it"):
        aug(crop, np.random.default_rng(0))
