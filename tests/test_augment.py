"""Issue 12: augmentation (deterministic per seed, epoch and index; SNR inside its range),
speed perturbation (labels and pitch), the built-in sets and folders without audio."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from rawnet_lib.config import AugmentConfig
from rawnet_lib.dataset.augment import Augmenter, AugmentError, ensure_builtin_sets, find_noises, find_rirs
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


def test_measured_snr_is_inside_each_kinds_range(sets):
    aug = _augmenter(sets, noise_prob=1.0, rir_prob=0.5)
    x = np.sin(2 * np.pi * 200 * np.arange(8000) / SR).astype(np.float32)
    seen = set()
    for i in range(60):
        m = aug.mix(x, np.random.default_rng([7, 1, i]))
        measured = 10 * np.log10(np.mean(m.speech.astype(float) ** 2) / np.mean(m.noise.astype(float) ** 2))
        low, high = aug.snr[m.kind]
        # float32 signals: the measured power ratio is exact to a few float32 eps, i.e. ~1e-5 dB
        tol = float(10 * np.log10(1 + 64 * np.finfo(np.float32).eps))
        assert low - tol <= measured <= high + tol and measured == pytest.approx(m.snr_db, abs=tol)
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
    changed = [not np.array_equal(ds[i][0].numpy(), (plain.set_epoch(2), plain[i][0].numpy())[1]) for i in range(len(ds))]
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
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            x, label = ds[i]
            k, speaker = divmod(label, 3)
            assert speaker == labels[i] and len(x) == 4000
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


def test_builtin_sets_are_made_once(tmp_path):
    noise, rirs = ensure_builtin_sets(tmp_path / "sets")
    kinds = find_noises(noise)
    assert sorted(kinds) == ["music", "noise"] and len(kinds["noise"]) == 12
    files = find_rirs(rirs)
    assert len(files) == 24 and {p.parent.parent.name for p in files} == {"smallroom", "mediumroom", "largeroom"}
    stamp = files[0].stat().st_mtime_ns
    assert ensure_builtin_sets(tmp_path / "sets") == (noise, rirs) and files[0].stat().st_mtime_ns == stamp
    speech = _tree(tmp_path / "dev_wav")
    aug = Augmenter.from_config(AugmentConfig(enabled=True, sets_dir=str(tmp_path / "sets")), babble_dir=speech)
    assert sorted(aug.noises) == ["music", "noise", "speech"] and len(aug.noises["speech"]) == 6
