"""Your own audio: the Verifier on files of many formats and rates, bad input, the CLI's JSON."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from rawnet_lib.bench import calibrate_batch_norm
from rawnet_lib.config import load_config
from rawnet_lib.dataset.anyaudio import ShortAudioWarning
from rawnet_lib.dataset.audio import SAMPLE_RATE, AudioError
from rawnet_lib.dataset.trials import TrialListError
from rawnet_lib.eval.calibrate import Calibration, calibration_path
from rawnet_lib.eval.embed import cpu_amp, utterance_crops
from rawnet_lib.models.checkpoint import CheckpointError, model_checkpoint, save_checkpoint
from rawnet_lib.models.rawnet2 import build_model
from rawnet_lib.verify import Verifier, VerifyError, main, read_pairs

REPO = Path(__file__).resolve().parents[1]
SECONDS = 2.0


def _voice(sr: int, f0: float, seconds: float = SECONDS, seed: int = 0) -> np.ndarray:
    """A harmonic tone with vibrato and a little noise: speech-like enough to exercise the model."""
    t = np.arange(int(seconds * sr)) / sr
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.05 * np.sin(2 * np.pi * 3 * t))) / sr
    x = sum(np.sin(k * phase) / k for k in range(1, 12) if k * f0 * 1.1 < sr / 2)
    x += 0.01 * np.random.default_rng(seed).standard_normal(t.size)
    return (0.5 * x / np.abs(x).max()).astype(np.float32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo-preset checkpoint with batch-norm statistics of speech-like input (untrained weights)."""
    cfg = load_config("demo")
    torch.manual_seed(0)
    model = build_model(cfg)
    calibrate_batch_norm(model, torch.from_numpy(np.stack([_voice(SAMPLE_RATE, f, 1.3)[:cfg.model.n_samples]
                                                           for f in (90, 130, 180, 220)])))
    path = tmp_path_factory.mktemp("ckpt") / "demo.pt"
    save_checkpoint(model_checkpoint(model, cfg, [], 1, 0.5), path)
    return path


@pytest.fixture(scope="module")
def verifier(checkpoint: Path) -> Verifier:
    """The CPU's fast path in float32, so that the numbers below hold on every CPU (by default it
    runs in bf16 where the CPU has bf16, whose rounding moves an untrained model's scores by
    ~1e-3: tests/test_amp.py bounds it)."""
    return Verifier.from_checkpoint(checkpoint, device="cpu", amp="off")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One utterance in many formats and rates, written here (m4a through ffmpeg)."""
    d = tmp_path_factory.mktemp("audio")
    out = {}
    for sr in (8000, 16000, 44100):
        out[f"wav{sr}"] = d / f"x{sr}.wav"
        sf.write(out[f"wav{sr}"], _voice(sr, 120), sr, subtype="PCM_16")
    x = _voice(SAMPLE_RATE, 120)
    out["stereo"] = d / "stereo.wav"
    sf.write(out["stereo"], np.stack([x, 0.5 * x], axis=1), SAMPLE_RATE, subtype="PCM_16")
    out["flac"] = d / "x.flac"
    sf.write(out["flac"], x, SAMPLE_RATE, subtype="PCM_16")
    out["ogg"] = d / "x.ogg"
    sf.write(out["ogg"], x, SAMPLE_RATE, format="OGG", subtype="VORBIS")
    if shutil.which("ffmpeg"):
        out["m4a"] = d / "x.m4a"
        subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(out["wav16000"]), "-c:a", "aac",
                        "-b:a", "96k", str(out["m4a"])], check=True)
    out["other"] = d / "other.wav"
    sf.write(out["other"], _voice(SAMPLE_RATE, 210, seed=1), SAMPLE_RATE, subtype="PCM_16")
    return out


def test_a_16k_wav_embeds_as_the_model_sees_its_reference_crops(verifier: Verifier, files) -> None:
    x = sf.read(files["wav16000"], dtype="float32")[0]
    crops = utterance_crops(x, verifier.cfg.model, verifier.cfg.evaluation)
    expected = verifier.forward(crops).mean(0)
    emb = verifier.embed(files["wav16000"])
    assert emb.shape == (verifier.cfg.model.embedding_dim,) and len(crops) == 2
    np.testing.assert_allclose(emb, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    assert verifier.protocol["crop_mode"] == "reference" and verifier.protocol["eval_hop"] == 15746


def test_the_cpu_runs_the_fast_path_with_the_exact_paths_embeddings(verifier: Verifier, checkpoint: Path,
                                                                     files) -> None:
    """On the CPU a checkpoint runs the fast path (bf16 only where the CPU has it); in float32
    it gives the exact path's embeddings to 1e-4 of their own scale, as in tests/test_fast.py."""
    default = Verifier.from_checkpoint(checkpoint, device="cpu")
    assert default.protocol["path"] == "fast" and default.protocol["amp"] == cpu_amp()
    exact = Verifier.from_checkpoint(checkpoint, device="cpu", fast=False)
    assert (exact.protocol["path"], exact.protocol["amp"]) == ("exact", cpu_amp())
    exact = Verifier.from_checkpoint(checkpoint, device="cpu", fast=False, amp="off")
    a, b = verifier.embed(files["wav16000"]), exact.embed(files["wav16000"])  # the fixture: fast, float32
    assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b)


def test_rates_channels_and_containers_become_the_same_16k_mono_signal(verifier: Verifier, files) -> None:
    x = sf.read(files["wav16000"], dtype="float32")[0]
    n = x.size
    for sr in (8000, 44100):   # soxr's resampling of the file's own samples, at the model's rate
        native = sf.read(files[f"wav{sr}"], dtype="float32")[0]
        np.testing.assert_allclose(verifier.samples(files[f"wav{sr}"]), soxr.resample(native, sr, SAMPLE_RATE, "HQ"),
                                   atol=1e-6)
        assert abs(verifier.samples(files[f"wav{sr}"]).size - n) <= 1
    np.testing.assert_allclose(verifier.samples(files["stereo"]), 0.75 * x, atol=1.5 / 32768)  # channel mean
    # Lossless: equal up to one PCM16 step (libsndfile rounds float -> int16 per format).
    np.testing.assert_allclose(verifier.samples(files["flac"]), x, rtol=0, atol=1.01 / 32768)
    for lossy in ("ogg", "m4a"):
        if lossy not in files:
            continue
        y = verifier.samples(files[lossy])
        assert abs(y.size - n) < 0.05 * n, lossy
        m = min(y.size, n)
        assert np.corrcoef(x[:m], y[:m])[0, 1] > 0.95, lossy  # a codec keeps a clean harmonic tone


def test_every_format_embeds_to_a_finite_vector_close_to_the_original(verifier: Verifier, files) -> None:
    ref = verifier.embed(files["wav16000"])
    for name, path in files.items():
        emb = verifier.embed(path)
        assert emb.shape == ref.shape and np.isfinite(emb).all(), name
    # An array with its rate is the same as the file at that rate.
    x44 = sf.read(files["wav44100"], dtype="float32")[0]
    np.testing.assert_allclose(verifier.embed(x44, sr=44100), verifier.embed(files["wav44100"]), rtol=1e-5, atol=1e-6)


def test_score_verify_and_enroll(verifier: Verifier, files) -> None:
    same = verifier.score(files["wav16000"], files["flac"])
    assert same["score"] == pytest.approx(1.0, abs=1e-3) and "llr" not in same  # one PCM16 step apart
    with pytest.raises(VerifyError, match="no calibration"):
        verifier.verify(files["wav16000"], files["other"])
    result = verifier.verify(files["wav16000"], files["other"], threshold=2.0)
    assert result["decision"] is False and result["operating_point"] == "threshold"
    spk = verifier.enroll("alice", [files["wav16000"], files["flac"], files["stereo"]])
    assert spk.shape == verifier.embed(files["wav16000"]).shape
    assert verifier.score("alice", files["wav16000"])["score"] > 0.99


def test_a_calibration_gives_llr_and_a_decision(checkpoint: Path, files) -> None:
    cal = Calibration(slope=10.0, offset=-5.0, thresholds={"eer": 0.5, "far_0.01": 0.9}, metrics={})
    v = Verifier.from_checkpoint(checkpoint, device="cpu")
    v.calibration = cal
    r = v.verify(files["wav16000"], files["other"])
    assert r["llr"] == pytest.approx(10 * r["score"] - 5) and r["decision"] == (r["score"] >= 0.5)
    assert v.verify(files["wav16000"], files["other"], "far_0.01")["threshold"] == 0.9


def test_bad_files_are_named_and_a_batch_goes_on(verifier: Verifier, files, tmp_path: Path) -> None:
    empty = tmp_path / "empty.wav"
    empty.touch()
    text = tmp_path / "notes.wav"
    text.write_text("not audio at all\n" * 20)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(AudioError, match=r"empty\.wav: empty file"):
        verifier.embed(empty)
    with pytest.raises(AudioError, match=r"notes\.wav: not readable audio.*re-export"):
        verifier.embed(text)
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(SAMPLE_RATE * 2, np.float32), SAMPLE_RATE)
    with pytest.raises(AudioError, match=r"silent\.wav: digital silence \(every sample is 0\)"):
        verifier.embed(silent)
    found = verifier.embed_many([files["wav16000"], text, files["flac"], empty, tmp_path / "nothing",
                                 tmp_path / "missing.wav"], progress=False)
    assert list(found.embeddings) == [str(files["wav16000"]), str(files["flac"])]
    failed = dict(found.failed)
    assert set(failed) == {str(text), str(empty), str(tmp_path / "nothing"), str(tmp_path / "missing.wav")}
    assert "without audio" in failed[str(tmp_path / "nothing")]


def test_odd_files_and_names_are_read_or_named_with_the_fix(verifier: Verifier, files, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-UTF-8 name, a colon that ffmpeg would take for a protocol (`take1:b.m4a`), a folder
    given as one file and headerless raw samples: read, or an AudioError naming the file, never
    a library's TypeError or UnicodeEncodeError (which would also stop a batch)."""
    latin = Path(os.fsdecode(bytes(tmp_path) + "/caf\xe9 1.wav".encode("latin-1")))
    shutil.copyfile(files["wav16000"], latin)
    np.testing.assert_array_equal(verifier.samples(latin), verifier.samples(files["wav16000"]))
    raw = tmp_path / "take.raw"
    raw.write_bytes(sf.read(files["wav16000"], dtype="int16")[0].tobytes())
    with pytest.raises(AudioError, match=r"take\.raw: headerless raw samples.*ffmpeg -f s16le -ar"):
        verifier.samples(raw)
    with pytest.raises(AudioError, match=r"audio\d*: a folder; give one audio file"):
        verifier.samples(files["wav16000"].parent)
    found = verifier.embed_many([latin, raw], progress=False)
    assert list(found.embeddings) == [str(latin)] and [p for p, _ in found.failed] == [str(raw)]
    if "m4a" in files:
        colon = tmp_path / "take1:b.m4a"
        shutil.copyfile(files["m4a"], colon)
        monkeypatch.chdir(tmp_path)  # a relative name, as typed in a shell
        np.testing.assert_array_equal(verifier.samples(Path(colon.name)), verifier.samples(files["m4a"]))


def test_saved_embeddings_replace_a_file_only_when_asked(verifier: Verifier, files, tmp_path: Path) -> None:
    from rawnet_lib.io import OutputExistsError
    found = verifier.embed_many([files["wav16000"]], progress=False)
    out = tmp_path / "mine.npz"
    out.write_bytes(b"someone's embeddings")
    with pytest.raises(OutputExistsError, match=r"mine\.npz exists"):
        found.save(out)
    assert out.read_bytes() == b"someone's embeddings"
    found.save(out, overwrite=True)
    with np.load(out) as z:
        assert z["keys"].tolist() == [str(files["wav16000"])]


def test_short_audio_warns(verifier: Verifier, tmp_path: Path) -> None:
    path = tmp_path / "short.wav"
    sf.write(path, _voice(SAMPLE_RATE, 150, 0.4), SAMPLE_RATE)
    with pytest.warns(ShortAudioWarning, match="0.40 s"):
        assert np.isfinite(verifier.embed(path)).all()


def test_a_checkpoint_of_the_wrong_kind_is_refused(tmp_path: Path) -> None:
    wrong = tmp_path / "optimizer.pt"
    torch.save({"step": torch.tensor(3), "lr": 0.1}, wrong)
    with pytest.raises(CheckpointError, match="optimizer.pt"):
        Verifier.from_checkpoint(wrong)
    not_onnx = tmp_path / "model.onnx"
    not_onnx.write_bytes(b"\x00garbage")
    with pytest.raises(Exception, match=r"model\.onnx: onnxruntime cannot load it"):
        Verifier.from_checkpoint(not_onnx)


def test_only_test_time_settings_can_be_overridden(checkpoint: Path) -> None:
    """sample_rate=8000 (meant for one's own 8 kHz audio) or another n_samples would change
    what the model is fed but not the weights: wrong scores, with a protocol that hides it."""
    for name, value in (("sample_rate", 8000), ("n_samples", 9000), ("sinc_kernel", 31)):
        with pytest.raises(VerifyError, match=rf"{name}: not a test-time setting; override only crop_mode, "
                                              r"eval_hop, eval_batch_size, fast, amp .*an array takes sr="):
            Verifier.from_checkpoint(checkpoint, device="cpu", **{name: value})


def test_pair_lists_with_and_without_labels(tmp_path: Path) -> None:
    (tmp_path / "a.wav").touch()
    good = tmp_path / "pairs.txt"
    good.write_text("# label a b\n1 a.wav b.wav\n0 a.wav /abs/c.wav\n")
    pairs = read_pairs(good)
    assert pairs.labels.tolist() == [1, 0] and pairs.a[0] == tmp_path / "a.wav" and str(pairs.b[1]) == "/abs/c.wav"
    assert read_pairs(_write(tmp_path / "u.txt", "a.wav b.wav\n")).labels is None
    with pytest.raises(TrialListError, match=r"line 2.*line 3"):
        read_pairs(_write(tmp_path / "bad.txt", "1 a b\n2 a b\na b c d\n"))
    with pytest.raises(TrialListError, match=r"line 2: compares a.wav with itself; line 3: the pair of line 1 again"):
        read_pairs(_write(tmp_path / "twice.txt", "1 a.wav b.wav\n1 a.wav a.wav\n0 b.wav a.wav  # swapped\n"))
    assert read_pairs(_write(tmp_path / "hash.txt", "1 c#1.wav d.wav # a comment\n")).a[0].name == "c#1.wav"
    (tmp_path / "latin.txt").write_bytes("1 caf\xe9.wav b.wav\n".encode("latin-1"))
    with pytest.raises(TrialListError, match=r"latin\.txt: not UTF-8 text .*save it as UTF-8"):
        read_pairs(tmp_path / "latin.txt")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_cli_score_prints_one_json_line(checkpoint: Path, files, capsys) -> None:
    """The flags run the API's paths: each score equals the Verifier's on the same path, up to
    float32 rounding of a cosine (a few eps). How close the paths are to one another is tested
    above; fast bf16 against exact float32 depends on the CPU's bf16 (cpu_amp), so not here."""
    pair = [str(files["wav16000"]), str(files["other"])]
    tol = 16 * float(np.finfo(np.float32).eps)
    main(["score", "--checkpoint", str(checkpoint), *pair, "--device", "cpu"])  # auto picks a GPU where one is
    line = capsys.readouterr().out.strip().splitlines()
    assert len(line) == 1
    result = json.loads(line[0])
    assert set(result) >= {"score", "crop_mode", "a", "b"} and "decision" not in result
    assert (result["path"], result["amp"]) == ("fast", cpu_amp())
    by_api = Verifier.from_checkpoint(checkpoint, device="cpu").score(*pair)["score"]
    assert result["score"] == pytest.approx(by_api, abs=tol)
    main(["score", "--checkpoint", str(checkpoint), *pair, "--device", "cpu", "--fast", "false", "--amp", "off"])
    exact = json.loads(capsys.readouterr().out)
    by_api = Verifier.from_checkpoint(checkpoint, device="cpu", fast=False, amp="off").score(*pair)["score"]
    assert (exact["path"], exact["amp"]) == ("exact", "off") and exact["score"] == pytest.approx(by_api, abs=tol)


def test_cli_embed_score_list_and_calibrate(checkpoint: Path, files, tmp_path: Path, capsys) -> None:
    ckpt = tmp_path / "model.pt"
    shutil.copyfile(checkpoint, ckpt)
    out = tmp_path / "emb.npz"
    main(["embed", "--checkpoint", str(ckpt), str(files["wav16000"].parent), "--out", str(out)])
    result = json.loads(capsys.readouterr().out)
    with np.load(out) as z:
        assert z["emb"].shape == (result["embedded"], 256) and json.loads(str(z["meta"]))["protocol"]["crop_mode"]
    names = [files[k].name for k in ("wav16000", "flac", "stereo", "other", "wav44100")]
    pairs = _write(tmp_path / "dev.txt", "".join(f"{int(i < 3)} {names[0]} {n}\n" for i, n in
                                                  enumerate(names[1:3] + ["x.ogg"] + names[3:])))
    two = [str(files["wav16000"]), str(files["other"])]
    with pytest.raises(VerifyError, match=r"--operating_point far_0.01: .*has none: run `python -m "
                                          r"rawnet_lib\.verify calibrate"):  # it was ignored without a word
        main(["score", "--checkpoint", str(ckpt), *two, "--operating_point", "far_0.01"])
    main(["calibrate", "--checkpoint", str(ckpt), "--trials", str(pairs), "--root", str(files["wav16000"].parent)])
    cal = json.loads(capsys.readouterr().out)
    assert Path(cal["calibration"]) == calibration_path(ckpt) and calibration_path(ckpt).is_file()
    main(["score", "--checkpoint", str(ckpt), "--trials", str(pairs), "--root", str(files["wav16000"].parent),
          "--out", str(tmp_path / "scores.txt")])
    listed = json.loads(capsys.readouterr().out)
    assert listed["scored"] == 5 and "eer_percent" in listed and "cllr" in listed
    assert len((tmp_path / "scores.txt").read_text().splitlines()) == 5
    main(["score", "--checkpoint", str(ckpt), str(files["wav16000"]), str(files["other"])])
    scored = json.loads(capsys.readouterr().out)
    assert set(scored) >= {"score", "llr", "decision", "operating_point", "threshold"}
    main(["score", "--checkpoint", str(ckpt), *two, "--operating_point", "min_dcf_0.01"])
    assert json.loads(capsys.readouterr().out)["operating_point"] == "min_dcf_0.01"
    with pytest.raises(VerifyError, match="--trials writes scores only"):
        main(["score", "--checkpoint", str(ckpt), "--trials", str(pairs), "--operating_point", "eer"])

    # nothing is replaced without --overwrite, and an input never, before any embedding
    from rawnet_lib.io import OutputExistsError
    before = ckpt.read_bytes(), calibration_path(ckpt).read_text()
    other = str(files["other"])
    for argv, match in ((["embed", "--checkpoint", str(ckpt), other, "--out", str(out)], "emb.npz exists"),
                        (["embed", "--checkpoint", str(ckpt), other, "--out", str(ckpt), "--overwrite"],
                         "model.pt is also an input"),
                        (["score", "--checkpoint", str(ckpt), "--trials", str(pairs), "--out", str(pairs),
                          "--overwrite"], "dev.txt is also an input"),
                        (["calibrate", "--checkpoint", str(ckpt), "--trials", str(pairs)],
                         r"model\.calibration\.json exists; give another output path, or --overwrite")):
        with pytest.raises(OutputExistsError, match=match):
            main(argv)
    assert (ckpt.read_bytes(), calibration_path(ckpt).read_text()) == before
    main(["calibrate", "--checkpoint", str(ckpt), "--trials", str(pairs), "--root", str(files["wav16000"].parent),
          "--overwrite"])
    assert json.loads(capsys.readouterr().out)["calibration"] == str(calibration_path(ckpt))


def test_a_calibration_is_used_only_for_the_weights_and_crops_it_was_fitted_for(checkpoint: Path, files,
                                                                                 tmp_path: Path) -> None:
    from rawnet_lib.eval.calibrate import CalibrationError
    from rawnet_lib.io import OutputExistsError, file_sha1
    ckpt = tmp_path / "model.pt"
    shutil.copyfile(checkpoint, ckpt)
    names = [files[k].name for k in ("wav16000", "flac", "stereo", "other", "wav44100")]
    pairs = read_pairs(_write(tmp_path / "dev.txt", "".join(f"{int(i < 2)} {names[0]} {n}\n"
                                                             for i, n in enumerate(names[1:]))),
                       [files["wav16000"].parent])
    v = Verifier.from_checkpoint(ckpt, device="cpu", amp="off")
    v.calibrate(pairs, progress=False)
    assert v.calibration.source["model_sha1"] == file_sha1(ckpt)
    with pytest.raises(OutputExistsError, match=r"model\.calibration\.json exists"):
        v.calibrate(pairs, progress=False)  # refused before any embedding
    assert Verifier.from_checkpoint(ckpt, device="cpu").calibration is not None  # bf16 or fast: rounding only
    with pytest.raises(CalibrationError, match=r"fitted for eval_hop \d+, but this model has eval_hop 1000"):
        Verifier.from_checkpoint(ckpt, device="cpu", eval_hop=1000)
    cfg = load_config("demo")
    torch.manual_seed(1)
    save_checkpoint(model_checkpoint(build_model(cfg), cfg, [], 2, 0.4), ckpt)  # a resumed run's new best
    with pytest.raises(CalibrationError, match=r"model\.calibration\.json was fitted for model_sha1"):
        Verifier.from_checkpoint(ckpt, device="cpu")


def test_cli_reports_a_bad_file_without_a_traceback(checkpoint: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_text("text")
    proc = subprocess.run([sys.executable, "-m", "rawnet_lib.verify", "score", "--checkpoint", str(checkpoint),
                           str(bad), str(bad)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and "bad.wav" in proc.stderr


def test_the_notebook_table_scores_every_file_of_a_folder(checkpoint: Path, files) -> None:
    from rawnet_lib.views.verify_notebook import VerifySession, comparison_table
    v = Verifier.from_checkpoint(checkpoint, device="cpu", amp="off")
    v.calibration = Calibration(slope=10.0, offset=-5.0, thresholds={"eer": 0.5}, metrics={})
    session = VerifySession(v, v.cfg, [files["wav16000"], files["flac"]], [files["stereo"], files["wav44100"]],
                            [files["other"]], "")
    table = comparison_table(session)
    assert list(table["pair"]) == ["enroll vs test: stereo.wav", "enroll vs test: x44100.wav", "enroll vs impostor"]
    enrolled = v.enroll("check", [files["wav16000"], files["flac"]])
    for path, score in zip([files["stereo"], files["wav44100"], files["other"]], table["score"]):
        assert score == pytest.approx(v.score("check", path)["score"], abs=1e-6), path
    assert np.array_equal(v.speakers["enrolled"], enrolled)


def test_the_notebook_figures_are_their_own_not_pyplot_s(checkpoint: Path, files) -> None:
    """Figures made outside pyplot show once where the notebook displays them and are freed when
    dropped; pyplot's would also be shown by the inline backend and kept open."""
    import matplotlib.pyplot as plt

    from rawnet_lib.views.verify_notebook import VerifySession, score_position, waveforms
    v = Verifier.from_checkpoint(checkpoint, device="cpu", amp="off")
    histogram = {"edges": [-1.0, 0.0, 0.5, 1.0], "target": [0, 1, 3], "nontarget": [4, 2, 0]}
    v.calibration = Calibration(slope=10.0, offset=-5.0, thresholds={"eer": 0.5}, metrics={}, histogram=histogram)
    session = VerifySession(v, v.cfg, [files["wav16000"]], [files["flac"]], [files["other"]], "")
    plt.close("all")
    wave = waveforms(session)
    marks = score_position(v.calibration, {"test": 0.7, "impostor": 0.1})
    assert plt.get_fignums() == []
    assert len(wave.axes) >= 6  # waveform over spectrogram for enroll, test and impostor
    lines = [line.get_xdata()[0] for line in marks.axes[0].get_lines()]
    assert lines == [0.7, 0.1, 0.5]  # the two scores and the EER threshold


def test_verify_notebook_runs_headless(run_notebook, smoke_run: Path, tiny_db: Path) -> None:
    checkpoint = smoke_run / "models" / "best_opt_eval.pt"
    out = run_notebook("verify", checkpoint=str(checkpoint), data_path=str(tiny_db))
    text = out.read_text()
    assert "<audio" in text and "enroll vs impostor" in text
    assert text.count('"image/png"') >= 2  # the waveforms and the scores on the development densities
    assert calibration_path(checkpoint).is_file()
