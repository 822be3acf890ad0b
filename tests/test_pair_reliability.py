"""experiments/pair_reliability.py: the pairs it draws, the reliability of P(same), the mix correction."""
import numpy as np
import pytest

from experiments import pair_reliability as pr
from siamese_jax.inference import Calibration


def test_pairs_are_one_class_then_two_classes_of_the_asked_kind():
    labels = np.repeat(np.arange(12), 3)
    groups = labels // 4  # three "alphabets" of four classes
    for within in (False, True):
        a, b, same = pr.draw_pairs(labels, groups, 200, seed=0, within_group=within)
        assert same.sum() == 200 and len(same) == 400
        assert (labels[a[same]] == labels[b[same]]).all() and (a[same] != b[same]).all()
        assert (labels[a[~same]] != labels[b[~same]]).all()
        assert (groups[a[~same]] == groups[b[~same]]).all() == within
    first, again = (pr.draw_pairs(labels, groups, 200, seed=0, within_group=True) for _ in range(2))
    assert all((x == y).all() for x, y in zip(first, again))
    assert not (pr.draw_pairs(labels, groups, 200, 1, True)[0] == first[0]).all()


def test_reliability_bins_ece_and_brier_by_hand():
    p = np.array([0.05, 0.05, 0.95, 0.95, 0.55])
    same = np.array([False, True, True, True, False])
    rows, ece, brier = pr.reliability(p, same)
    assert rows[0] == (0.0, 2, 0.05, 0.5) and rows[9] == (0.9, 2, 0.95, 1.0) and rows[5][1:] == (1, 0.55, 0.0)
    assert rows[3][1] == 0
    np.testing.assert_allclose(ece, (2 * 0.45 + 2 * 0.05 + 0.55) / 5)
    np.testing.assert_allclose(brier, np.mean((p - same) ** 2))
    # Weights as a mix of 1 in 5 one-class pairs: the same bins, each pair counted by its weight.
    w = pr.mix_weights(same, 0.2)
    np.testing.assert_allclose(np.average(same, weights=w), 0.2)
    _, ece_w, _ = pr.reliability(p, same, w)
    assert ece_w != ece


def test_the_mix_correction_multiplies_the_odds():
    np.testing.assert_allclose(pr.prior_corrected(0.5, 0.05), 0.05)
    np.testing.assert_allclose(pr.prior_corrected(0.9, 0.1), 0.5)
    assert pr.prior_corrected(1.0, 0.05) == 1.0 and pr.prior_corrected(0.0, 0.05) == 0.0


def test_the_report_scores_the_verdict_against_the_calibrations_claim():
    cal = Calibration(threshold=1.0, slope=4.0, method="max_accuracy", accuracy=0.9, false_accept_rate=0.1,
                      num_pairs=100)
    d = np.array([0.5, 0.9, 1.5, 2.0, 0.8, 1.2])
    same = np.array([True, True, True, False, False, False])
    lines = pr.report(cal, d, same)
    assert lines[0].startswith("verdict at threshold 1.0000: accuracy 0.6667, false accepts 0.3333, "
                               "false rejects 0.3333 (its calibration: accuracy 0.9000")
    assert lines[1].startswith("P(same): ECE ") and "odds" not in lines[1] and len(lines) == 3 + pr.BINS
    assert "with its odds x 0.05/0.95" in pr.report(cal, d, same, share=0.05)[1]


@pytest.mark.slow
def test_a_workdir_model_gives_only_the_scripts_own_lines_on_stderr(data_dir, tmp_path):
    """Loading a workdir's checkpoint logs through orbax; without the CLIs' logging set-up the script
    printed absl's raw INFO lines ("I1207 07:21:34.232998 ... checkpoint.py:459] Closing
    _NonBlockingMetadataStore(...)") before its own message."""
    import os
    import subprocess
    import sys

    from siamese_jax import train as train_lib
    from siamese_jax.configs import default

    c = default.get_config("mnist")
    c.update(dict(archive_dir=str(data_dir), widths=(8, 8), embedding_dim=16, val_episodes=10, eval_episodes=10,
                  batch_size=16, log_every_seconds=0.0, test_time_shifts="none", plots=False, num_steps=2,
                  eval_every_steps=100, checkpoint_every_steps=100))
    workdir = str(tmp_path / "run")
    train_lib.train(c, workdir)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "experiments.pair_reliability", f"--model={workdir}", "--pairs=20"],
                         cwd=repo, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, JAX_PLATFORMS="cpu", SIAMESE_DATA_DIR=str(data_dir)))
    assert out.returncode == 2 and out.stderr.splitlines() == [
        f"error: {workdir} has no calibration (siamese-calibrate gives it one)"], out.stderr
