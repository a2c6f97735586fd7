"""Issue 12: loss heads against hand-computed values, the margin schedule, LR schedules,
fine-tuning from a checkpoint, and bad recipe values refused before training."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from rawnet_lib.config import ConfigError, LossConfig, load_config
from rawnet_lib.io import atomic_torch_save
from rawnet_lib.models.checkpoint import init_from_checkpoint
from rawnet_lib.models.losses import build_loss, head_logits, margin_at
from rawnet_lib.models.rawnet2 import build_model
from rawnet_lib.training.run import RunExistsError, check_run_dir, run_path
from rawnet_lib.training.schedules import lr_factor, make_optimizer

# One embedding with known cosines to two class vectors: code (3, 4), |code| = 5,
# classes e1 and e2 -> cos = (0.6, 0.8); the true class is 1.
CODE = torch.tensor([[3.0, 4.0]])
# float32 cosines carry about eps of error each; the scale (30) and a few operations multiply it
# into the logits, and the loss error relative to the loss is at most that logit error
REL = 30 * 8 * float(np.finfo(np.float32).eps)
LABEL = torch.tensor([1])


def _fc() -> nn.Linear:
    fc = nn.Linear(2, 2)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 0.5]]))  # rows of other norms: cosines ignore them
        fc.bias.zero_()
    return fc


def _loss(head: str, **kw) -> float:
    cfg = LossConfig(head=head, **kw)
    return build_loss(cfg)(head_logits(CODE, _fc(), cfg), LABEL, epoch=1).item()


def test_softmax_head_is_the_reference_maths():
    # the reference: fc2_gru(code / (|code| / 10)) = W (6, 8) = (12, 4), then cross-entropy
    logits = head_logits(CODE, _fc(), LossConfig())
    assert torch.allclose(logits, torch.tensor([[12.0, 4.0]]))
    assert _loss("softmax") == pytest.approx(math.log(1 + math.exp(8.0)), rel=1e-6)


def test_am_head_hand_computed():
    # s (cos - m) at the target: (30 * 0.6, 30 * (0.8 - 0.2)) = (18, 18) -> CE = log 2
    assert _loss("am", margin=0.2, scale=30) == pytest.approx(math.log(2), rel=1e-6)
    # add_ce: plus CE of (18, 24)
    both = _loss("am", margin=0.2, scale=30, add_ce=True)
    assert both == pytest.approx(math.log(2) + math.log(1 + math.exp(-6)), rel=1e-6)


def test_aam_head_hand_computed():
    target = 0.8 * math.cos(0.2) - 0.6 * math.sin(0.2)  # cos(acos(0.8) + 0.2)
    expected = math.log(1 + math.exp(30 * 0.6 - 30 * target))
    assert _loss("aam", margin=0.2, scale=30) == pytest.approx(expected, rel=REL)


def test_aam_easy_margin_leaves_obtuse_angles_alone():
    code = torch.tensor([[-3.0, -4.0]])  # cos to the target e2 is -0.8 < 0, theta + m still below pi
    for easy, target in ((True, -0.8), (False, -0.8 * math.cos(0.2) - 0.6 * math.sin(0.2))):
        cfg = LossConfig(head="aam", margin=0.2, scale=30, easy_margin=easy)
        got = build_loss(cfg)(head_logits(code, _fc(), cfg), LABEL).item()
        assert got == pytest.approx(math.log(1 + math.exp(30 * -0.6 - 30 * target)), rel=REL)


def test_aam_beyond_pi_minus_m_takes_the_linear_stand_in():
    """Past theta = pi - m, cos(theta + m) would rise again and reward a worse angle; the usual stand-in
    cos(theta) - sin(pi - m) m keeps the target logit falling (insightface, WeSpeaker)."""
    code = torch.tensor([[-0.28, -0.96]])  # cos to the target e2 is -0.96 < cos(pi - 0.5) = -0.8776
    cfg = LossConfig(head="aam", margin=0.5, scale=30)
    target = -0.96 - math.sin(math.pi - 0.5) * 0.5
    got = build_loss(cfg)(head_logits(code, _fc(), cfg), LABEL).item()
    assert got == pytest.approx(math.log1p(math.exp(30 * -0.28 - 30 * target)), rel=REL)


def test_margin_schedule_is_a_linear_warm_up():
    cfg = LossConfig(head="aam", margin=0.2, margin_schedule=[2, 4])
    assert [margin_at(cfg, e) for e in (1, 2, 3, 4, 10)] == pytest.approx([0, 0, 0.1, 0.2, 0.2])
    assert margin_at(LossConfig(margin=0.3), 1) == 0.3
    step = LossConfig(head="aam", margin=0.2, margin_schedule=[3, 3])  # no ramp: the full margin from epoch 3
    assert [margin_at(step, e) for e in (1, 2, 3, 4)] == [0, 0, 0.2, 0.2]
    # margin 0 at the first epoch: aam is then plain scaled-cosine cross-entropy
    first = _loss("aam", margin=0.2, scale=30, margin_schedule=[1, 3])
    assert first == pytest.approx(math.log(1 + math.exp(30 * (0.6 - 0.8))), rel=REL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_cosine_of_exactly_one_keeps_the_aam_gradient_finite(dtype):
    """bf16 rounds a cosine near 1 to exactly 1 (2.5 degrees is enough at scale 30), where the
    margin's sine has no derivative: the head computes in float32 and the sine stays off 0."""
    cfg = LossConfig(head="aam", margin=0.2, scale=30)
    fc = _fc()
    code = torch.tensor([[0.0, 1.0], [math.sin(math.radians(2.5)), math.cos(math.radians(2.5))]], requires_grad=True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = build_loss(cfg)(head_logits(code, fc, cfg), torch.tensor([1, 1]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(code.grad).all() and torch.isfinite(fc.weight.grad).all()


def test_margin_heads_keep_the_state_dict_names():
    softmax = build_model("smoke", n_classes=4)
    aam = build_model(load_config("smoke", loss={"head": "aam"}), n_classes=4)
    aam.load_state_dict(softmax.state_dict(), strict=True)  # same keys and shapes
    assert not aam.fc2_gru.bias.requires_grad and softmax.fc2_gru.bias.requires_grad
    x = torch.randn(2, 6561)
    aam.eval()
    logits = aam(x)
    assert logits.abs().max() <= 30 + 1e-4  # scaled cosines
    optimizer, _ = make_optimizer(aam, load_config("smoke"))
    assert all(p is not aam.fc2_gru.bias for g in optimizer.param_groups for p in g["params"])


def _lrs(optim: dict, epochs: int = 6, spe: int = 4) -> np.ndarray:
    cfg = load_config("smoke", optim={"lr": 1e-3, **optim}, epochs=epochs)
    model = nn.Linear(2, 2)
    optimizer, scheduler = make_optimizer(model, cfg, spe)
    lrs = []
    for _ in range(epochs * spe):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return np.array(lrs)


def test_each_schedule_lr_curve():
    steps = np.arange(24)
    assert np.allclose(_lrs({"lr_decay": "keras", "keras_decay": 0.1}), 1e-3 / (1 + 0.1 * steps))
    assert np.allclose(_lrs({"lr_decay": "none"}), 1e-3)
    assert np.allclose(_lrs({"lr_decay": "exponential", "lr_gamma": 0.5}), 1e-3 * 0.5 ** (steps // 4))
    assert np.allclose(_lrs({"lr_decay": "step", "lr_gamma": 0.5, "step_epochs": 2}), 1e-3 * 0.5 ** (steps // 8))
    cos = _lrs({"lr_decay": "cosine", "warmup_epochs": 1, "min_lr": 1e-5})
    assert np.allclose(cos[:4], 1e-3 * np.arange(1, 5) / 4)  # linear warm-up over the first epoch
    t = (steps[4:] - 4) / 20
    assert np.allclose(cos[4:], 1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + np.cos(np.pi * t)))
    sgdr = _lrs({"lr_decay": "sgdr", "restart_epochs": 2, "restart_mult": 2, "min_lr": 0})
    assert [s for s in range(1, 24) if sgdr[s] > sgdr[s - 1]] == [8]  # cycles of 2 then 4 epochs
    assert np.allclose(sgdr, 1e-3 * 0.5 * (1 + np.cos(np.pi * np.r_[np.arange(8) / 8, np.arange(16) / 16])))
    floor = _lrs({"lr_decay": "sgdr", "restart_epochs": 2, "min_lr": 1e-4})
    assert np.allclose(floor[:8], 1e-4 + 9e-4 * 0.5 * (1 + np.cos(np.pi * np.arange(8) / 8)))
    assert np.allclose(_lrs({"lr_decay": "step", "step_epochs": 10}, epochs=12, spe=1),  # voxceleb_trainer's steplr
                       1e-3 * 0.75 ** (np.arange(12) >= 10))


def test_a_skipped_first_update_moves_the_schedule_without_a_warning():
    """fp16's GradScaler skips an update whose gradients overflow (its first, typically); the schedule
    still counts the iteration, and torch's warning about the calling order stays silent."""
    model = nn.Linear(2, 2)
    optimizer, scheduler = make_optimizer(model, load_config("smoke", optim={"lr_decay": "keras", "keras_decay": 0.1}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scheduler.step()  # no optimizer.step() before it: the skipped update
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-3 / 1.2)


def test_optimizers_by_name():
    model = nn.Linear(2, 2)
    for name, kind in (("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)):
        optimizer, _ = make_optimizer(model, load_config("smoke", optimizer=name, nesterov=name == "sgd"))
        assert type(optimizer) is kind
    assert optimizer.defaults["nesterov"] and optimizer.defaults["momentum"] == 0.9


def test_lr_factor_default_is_the_reference_keras_decay():
    factor = lr_factor(load_config("paper").optim, 80, 1000)
    assert factor(0) == 1.0 and factor(10_000) == pytest.approx(0.5)


def test_init_from_reinitialises_ln_and_classes(tmp_path):
    old = build_model("smoke", n_classes=3)
    atomic_torch_save({"model": old.state_dict(), "config": load_config("smoke").to_dict()}, tmp_path / "a.pt")
    new = build_model(load_config("smoke", n_samples=8000), n_classes=5)
    notes = init_from_checkpoint(tmp_path / "a.pt", new)
    assert len(notes) == 2 and "ln re-initialised" in notes[0] and "(8000,)" in notes[0] and "fc2_gru" in notes[1]
    assert torch.equal(new.block2[0].conv1.weight, old.block2[0].conv1.weight)
    assert torch.equal(new.ln.gamma, torch.ones(8000)) and new.fc2_gru.weight.shape == (5, 32)
    from rawnet_lib.models.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="only n_samples and layer_norm may change"):
        init_from_checkpoint(tmp_path / "a.pt", build_model(load_config("smoke", gru_units=16), 3))
    # a bare state_dict saved from nn.DataParallel (every key `module.`) starts a fine-tuning too
    atomic_torch_save({f"module.{k}": v for k, v in old.state_dict().items()}, tmp_path / "dp.pt")
    again = build_model("smoke", n_classes=3)
    assert init_from_checkpoint(tmp_path / "dp.pt", again) == []
    assert all(torch.equal(again.state_dict()[k], v) for k, v in old.state_dict().items())


def test_init_from_maps_class_rows_by_speaker_name(tmp_path):
    """Fine-tuning on other data, or with the speed factors in another order, keeps each class's own
    row of fc2_gru and starts the others fresh; the same classes in the same order load unchanged."""
    torch.manual_seed(0)
    old = build_model("smoke", n_classes=4)
    named = ["a", "b", "a@sp0.9", "b@sp0.9"]
    atomic_torch_save({"model": old.state_dict(), "config": load_config("smoke").to_dict(), "speakers": named},
                      tmp_path / "a.pt")
    rows = old.fc2_gru.weight.detach()
    same = build_model("smoke", n_classes=4)
    assert init_from_checkpoint(tmp_path / "a.pt", same, named) == []
    assert torch.equal(same.fc2_gru.weight, rows)
    swapped = build_model("smoke", n_classes=4)  # speed_perturb [0.9, 1.0] instead of [1.0, 0.9]: as many classes
    notes = init_from_checkpoint(tmp_path / "a.pt", swapped, ["a@sp0.9", "b@sp0.9", "a", "b"])
    assert torch.equal(swapped.fc2_gru.weight, rows[[2, 3, 0, 1]])
    assert notes == [f"init_from {tmp_path / 'a.pt'}: the classes changed: fc2_gru keeps the rows of the 4 speaker(s) "
                     "of the checkpoint's 4 that this run has, by name; 0 of the run's 4 start fresh"]
    other = build_model("smoke", n_classes=3)  # other data: b stays, c and d are new
    fresh = other.fc2_gru.weight.detach().clone()
    notes = init_from_checkpoint(tmp_path / "a.pt", other, ["b", "c", "d"])
    assert torch.equal(other.fc2_gru.weight[0], rows[1]) and torch.equal(other.fc2_gru.weight[1:], fresh[1:])
    assert "keeps the rows of the 1 speaker(s) of the checkpoint's 4" in notes[0] and "2 of the run's 3" in notes[0]
    assert torch.equal(other.block0[0].conv1.weight, old.block0[0].conv1.weight)


def test_init_from_into_a_model_without_layer_norm_drops_it(tmp_path):
    old = build_model("smoke", n_classes=3)
    atomic_torch_save({"model": old.state_dict(), "config": load_config("smoke").to_dict()}, tmp_path / "a.pt")
    bare = build_model(load_config("smoke", layer_norm=False), n_classes=3)
    notes = init_from_checkpoint(tmp_path / "a.pt", bare)
    assert len(notes) == 1 and "no layer norm (layer_norm: false): the checkpoint's ln dropped" in notes[0]
    assert all(torch.equal(bare.state_dict()[k], v) for k, v in old.state_dict().items() if not k.startswith("ln."))
    atomic_torch_save({"model": bare.state_dict()}, tmp_path / "bare.pt")  # and back: ln starts as the identity
    back = build_model("smoke", n_classes=3)
    notes = init_from_checkpoint(tmp_path / "bare.pt", back)
    assert len(notes) == 1 and "no layer norm: ln starts as the identity affine" in notes[0]
    assert torch.equal(back.ln.gamma, torch.ones_like(back.ln.gamma)) and not back.ln.beta.any()


def test_init_from_inside_the_folder_overwrite_deletes_is_refused(tmp_path):
    """A fine-tuning named like the run it starts from, with overwrite: true, would delete its
    source weights before reading them: refused before anything is touched."""
    cfg = load_config("smoke", out_dir=str(tmp_path), name="ft", overwrite=True)
    source = run_path(cfg) / "models" / "best_opt_eval.pt"
    source.parent.mkdir(parents=True)
    source.write_bytes(b"weights")
    cfg.train.init_from = str(source)
    with pytest.raises(RunExistsError, match=r"init_from .*best_opt_eval.pt lies in .*ft, which overwrite: true"):
        check_run_dir(cfg)
    (source.parent / "link.pt").symlink_to(tmp_path / "elsewhere.pt")  # a link in the folder dies with it too
    cfg.train.init_from = str(source.parent / "link.pt")
    with pytest.raises(RunExistsError, match=r"init_from .*link.pt lies in"):
        check_run_dir(cfg)
    assert source.read_bytes() == b"weights"
    cfg.train.name = "ft2"  # another name: a new run from those weights
    assert check_run_dir(cfg) == run_path(cfg)


@pytest.mark.parametrize("blocks, match", [
    ({"loss": {"head": "arcface"}}, r"head='arcface' is not one of softmax, am, aam"),
    ({"optim": {"lr_decay": "cosin"}}, r"lr_decay='cosin' is not one of keras, none, cosine, exponential, step, sgdr"),
    ({"optim": {"optimizer": "lamb"}}, r"optimizer='lamb' is not one of adam, adamw, sgd"),
    ({"loss": {"margin_schedule": [4, 2]}}, r"margin_schedule=\[4, 2\]"),
    ({"data": {"speed_perturb": [0.9, -1.0]}}, r"speed_perturb"),
    ({"augment": {"snr_noise": [15, 0]}}, r"snr_noise"),
    ({"loss": {"hed": "am"}}, r"unknown parameter 'loss.hed'; did you mean head"),
])
def test_bad_recipe_values_name_the_value_and_choices(blocks, match):
    with pytest.raises(ConfigError, match=match):
        load_config("smoke", blocks)


def test_presets_load():
    modified = load_config("rawnet2_modified")
    assert modified.loss.head == "am" and modified.loss.add_ce and modified.optim.lr_decay == "cosine"
    assert not modified.optim.amsgrad  # RawNet2_modified/parser.py's default, not the paper's amsgrad
    assert modified.model.blocks == [128, 128, 256, 256, 256, 512, 512, 512] and modified.train.epochs == 160
    demo, modern = load_config("demo"), load_config("demo_modern")
    assert modern.model == demo.model and modern.train.epochs == demo.train.epochs
    assert modern.train.batch_size == demo.train.batch_size and modern.augment.enabled
