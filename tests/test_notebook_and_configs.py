import ast
import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_colab_notebook_is_valid_and_its_code_parses():
    with open(os.path.join(REPO, "experiments", "colab_tpu.ipynb")) as f:
        nb = json.load(f)
    assert nb["nbformat"] == 4
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert len(code) >= 3
    for cell in code:
        # IPython's `!shell` and `%magic` lines are not Python; everything else must parse.
        src = "\n".join(line for line in "".join(cell["source"]).splitlines()
                        if not line.lstrip().startswith(("!", "%")))
        ast.parse(src)
    text = "".join("".join(c["source"]) for c in code)
    assert "omniglot_koch" in text and "train_and_evaluate" in text
    # What executing it as a Colab user found (BUILD_NOTES, stop 40): a second "Run all" cloned the
    # repository into itself and trained from step 0 in an empty relative workdir; orbax's INFO lines
    # buried the progress (~48 per checkpoint); IPython expanded `$f` from the user's namespace.
    assert "test -d /content/siamese-jax || (rm -rf /content/siamese-jax.part && git clone" in text
    # A download cut off half-way was kept for ever (`wget -nc` writes the final name and then skips
    # it): each archive goes to `.part` and is moved into place when complete (stop 45's write audit).
    assert "wget -q -O $$n.part" in text and "mv $$n.part $$n" in text and "wget -q -nc" not in text
    assert re.findall(r"workdir = '([^']*)'", text) and all(
        w.startswith("/content/") for w in re.findall(r"workdir = '([^']*)'", text))
    assert "'orbax'" in text and "setLevel(logging.WARNING)" in text
    assert "/$$f &&" in text and "/$f " not in text


def test_configs_load_and_koch_config_builds_the_paper_model():
    import jax

    from experiments.configs import default, omniglot_koch
    from siamese_jax import input_pipeline, models

    for dataset in ("omniglot", "mnist"):
        c = default.get_config(dataset)
        assert c.dataset == dataset and c.loss in c.margins
    koch = omniglot_koch.get_config()
    # Koch et al.'s affine ranges, spelled out (the default's augmentation is different), no elastic field.
    aff = input_pipeline.augment_config(koch)
    assert (aff.rotation_deg, aff.shear, aff.scale, aff.translate_px, aff.prob, aff.elastic_alpha) == (
        10.0, 0.3, (0.8, 1.2), 2.0, 0.5, 0.0)
    model = models.build_model(koch)
    shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.PRNGKey(0), koch.image_size))
    assert models.count_params(shapes["params"]) == 38_951_745
    with pytest.raises(ValueError, match="unknown dataset"):
        default.get_config("cifar10")


def test_every_loss_is_a_valid_choice_on_both_presets():
    """`--loss=X` with a preset works for every loss the step knows: a margin entry, the config check,
    and the command line's list of choices (read from its source: importing it defines absl flags)."""
    import ast
    import pathlib

    from experiments.configs import default
    from siamese_jax import config_check, train
    from siamese_jax import train_step as ts

    cli_source = (pathlib.Path(__file__).resolve().parent.parent / "siamese_jax" / "cli" / "train.py").read_text()
    cli_losses = next(ast.literal_eval(node.value) for node in ast.walk(ast.parse(cli_source))
                      if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "LOSSES")
    assert sorted(cli_losses) == sorted(ts.ALL_LOSSES)
    for dataset in ("omniglot", "mnist"):
        for loss in ts.ALL_LOSSES:
            c = default.get_config(dataset)
            c.loss = loss
            if loss in ts.DIRECTION_LOSSES:  # documented: --loss=arcface / multi_similarity need l2_normalize=True
                with pytest.raises(config_check.ConfigError, match="l2_normalize"):
                    config_check.validate_config(c, num_devices=2)
                c.l2_normalize = True
            # Otherwise as given, with no override: the MNIST preset kept Omniglot's 32 classes per
            # batch, so `--dataset=mnist` failed with every P x K loss ("MNIST has 10 classes").
            config_check.validate_config(c, num_devices=2)
            assert train.margin_of(c) >= 0.0


def test_the_loss_sweep_and_the_readme_list_every_loss():
    """The places a new loss must also reach that nothing else would flag: the loss comparison's rows
    (every loss, the triplet loss once per selection) and README's `--loss` list."""
    import pathlib
    import re

    from experiments import loss_sweep
    from siamese_jax import train_step as ts

    swept = {(o["loss"], o.get("triplet_selection")) for _, _, o in loss_sweep.ROWS}
    want = {(loss, selection) for loss in ts.ALL_LOSSES
            for selection in (ts.TRIPLET_SELECTIONS if loss in ts.TRIPLET_LOSSES else (None,))}
    assert swept == want
    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    [listed] = re.findall(r"`--loss` ∈ `([^`]+)`", readme)
    assert sorted(listed.split(", ")) == sorted(ts.ALL_LOSSES)


def test_shipped_model_config_is_valid_and_differs_from_the_default_as_documented():
    from experiments.configs import default, omniglot_pretrained
    from siamese_jax import augment, config_check, input_pipeline

    c, d = omniglot_pretrained.get_config(), default.get_config("omniglot")
    config_check.validate_config(c, num_devices=2)
    changed = {k for k in d.keys() if c[k] != d[k]}
    assert changed == {"image_size", "embedding_dim", "num_steps", "augment_translate_px", "augment_elastic_alpha",
                       "eval_every_steps", "checkpoint_every_steps", "test_time_shifts", "val_alphabet_names"}
    assert c.test_time_shifts == "none"  # the shipped model embeds one view: 6x faster than nine
    # Shifts only, of +-2 px at its 48 px input: the default's without its elastic field.
    aff = input_pipeline.augment_config(c)
    assert aff.translate_px * c.image_size / aff.translate_reference_size == pytest.approx(2.0, abs=0.02)
    assert (aff.rotation_deg, aff.shear, aff.scale, aff.prob, aff.elastic_alpha) == (0.0, 0.0, (1.0, 1.0), 1.0, 0.0)
    assert augment.KOCH_IMAGE_SIZE == aff.translate_reference_size


def test_default_augmentation_is_shifts_and_a_mild_elastic_field_and_the_mnist_preset_has_none():
    """What BUILD_NOTES' "Augmenting make train" chose on validation: +-2 px shifts of every image at
    35 px and Simard's elastic field (alpha 42, sigma 7.5 px); rotation, shear and scale off. At test
    time the mean over the 3 x 3 square of 1-px shifts ("Test-time shift averaging on Omniglot");
    the MNIST preset and Koch et al.'s reproduction, measured with one view, keep one."""
    from experiments.configs import default, omniglot_koch
    from siamese_jax import config_check, input_pipeline

    c = default.get_config("omniglot")
    config_check.validate_config(c, num_devices=2)
    aff = input_pipeline.augment_config(c)
    assert aff.translate_px * c.image_size / aff.translate_reference_size == pytest.approx(2.0)
    assert (aff.rotation_deg, aff.shear, aff.scale, aff.prob) == (0.0, 0.0, (1.0, 1.0), 1.0)
    assert (aff.elastic_alpha, aff.elastic_sigma) == (42.0, 7.5)
    m = default.get_config("mnist")
    assert input_pipeline.augment_config(m) is None and m.augment_elastic_alpha == 0.0
    assert (c.test_time_shifts, m.test_time_shifts, omniglot_koch.get_config().test_time_shifts) == (
        "square9", "none", "none")


def test_library_import_is_light():
    """`import siamese_jax` and its data/loss modules do not pull TensorFlow, TFDS or matplotlib."""
    code = ("import sys, siamese_jax, siamese_jax.data, siamese_jax.losses, siamese_jax.train, siamese_jax.plots; "
            "bad = [m for m in ('tensorflow', 'tensorflow_datasets', 'matplotlib') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stdout + r.stderr


def test_mnist_pairs_config_is_valid_and_differs_from_the_mnist_preset_as_documented():
    from experiments.configs import default, mnist_pairs
    from siamese_jax import config_check, input_pipeline

    c, d = mnist_pairs.get_config(), default.get_config("mnist")
    config_check.validate_config(c, num_devices=2)
    changed = {k for k in d.keys() if c[k] != d[k]}
    assert changed == {"loss", "images_per_class", "embedding_dim", "l2_normalize", "augment",
                       "augment_rotation_deg", "augment_scale_min", "augment_scale_max", "augment_translate_px",
                       "num_steps", "val_episodes", "widths", "test_time_shifts"}
    assert c.dataset == "mnist" and c.image_size == 28 and c.loss == "batch_all"
    assert tuple(c.widths) == (32, 64, 128, 256) and c.test_time_shifts == "square9"  # run W, 9 views
    # +-2 px shifts at MNIST's 28 px.
    aff = input_pipeline.augment_config(c)
    assert aff.translate_px * c.image_size / aff.translate_reference_size == pytest.approx(2.0, abs=0.01)


def test_distilled_config_is_the_shipped_config_plus_its_five_teachers(tmp_path):
    """omniglot_distilled: the student is omniglot_pretrained with distillation from five teacher
    workdirs; each teacher is omniglot_pretrained with its documented overrides (BUILD_NOTES runs
    W, X, 56 and seeds 1, 2), and every one of those configs passes the config check."""
    from experiments.configs import omniglot_distilled, omniglot_pretrained
    from siamese_jax import config_check
    from siamese_jax.cli import resolve_config_argument

    shipped = omniglot_pretrained.get_config()
    for name, overrides in omniglot_distilled.TEACHERS.items():
        t = omniglot_distilled.get_config(f"teacher={name}")
        config_check.validate_config(t, num_devices=2)
        changed = {k for k in shipped.keys() if t[k] != shipped[k]}
        assert changed == set(overrides) and not t.distill_teachers, name
    with pytest.raises(ValueError, match="unknown teacher 'omni-z'"):
        omniglot_distilled.get_config("teacher=omni-z")
    with pytest.raises(ValueError, match="unknown argument"):
        omniglot_distilled.get_config("teachers=runs")

    student = omniglot_distilled.get_config(f"teachers_dir={tmp_path}")
    assert {k for k in shipped.keys() if student[k] != shipped[k]} == {"distill_teachers", "distill_weight"}
    assert student.distill_weight == 10.0
    assert config_check.distill_teacher_sources(student) == [str(tmp_path / n) for n in omniglot_distilled.TEACHERS]
    assert omniglot_distilled.get_config().distill_teachers.startswith("runs/omni-pre-s1,")
    # The teachers must be finished runs: refused until each workdir exists and has its config.json.
    with pytest.raises(config_check.ConfigError, match="omni-pre-s1: no such workdir or file"):
        config_check.validate_config(student, num_devices=2)
    for name in omniglot_distilled.TEACHERS:
        (tmp_path / name).mkdir()
    with pytest.raises(config_check.ConfigError, match="omni-pre-s1 has no config.json"):
        config_check.validate_config(student, num_devices=2)
    for name in omniglot_distilled.TEACHERS:
        (tmp_path / name / "config.json").write_text("{}")
    config_check.validate_config(student, num_devices=2)
    # By name, as an installed user types it, with the argument kept.
    (resolved,) = resolve_config_argument(["--config=omniglot_distilled:teacher=omni-w-s0"])
    assert resolved.endswith(os.path.join("configs", "omniglot_distilled.py") + ":teacher=omni-w-s0")


def test_gpu_config_is_the_recipe_the_issues_quote():
    """omniglot_gpu: 4 x conv-128 + BatchNorm at 56 px, batch-hard on P x K 128 x 4, 6,000 steps,
    rotation classes and +-2 px shifts (no elastic field), bf16 compute; valid for 1 and 8 devices."""
    import jax

    from experiments.configs import default, omniglot_gpu
    from siamese_jax import config_check, input_pipeline, models

    c, d = omniglot_gpu.get_config(), default.get_config("omniglot")
    for devices in (1, 8):
        config_check.validate_config(c, num_devices=devices)
    changed = {k for k in d.keys() if c[k] != d[k]}
    assert changed == {"loss", "widths", "image_size", "embedding_dim", "compute_dtype", "classes_per_batch",
                       "num_steps", "augment_translate_px", "augment_elastic_alpha"}
    assert (c.loss, tuple(c.widths), c.image_size, c.classes_per_batch, c.images_per_class, c.num_steps) == (
        "batch_hard", (128, 128, 128, 128), 56, 128, 4, 6000)
    assert c.rotation_classes and c.compute_dtype == "bfloat16"
    aff = input_pipeline.augment_config(c)
    assert aff.translate_px * c.image_size / aff.translate_reference_size == pytest.approx(2.0)
    assert (aff.rotation_deg, aff.shear, aff.scale, aff.prob, aff.elastic_alpha) == (0.0, 0.0, (1.0, 1.0), 1.0, 0.0)
    model = models.build_model(c)
    shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.PRNGKey(0), c.image_size))
    # 4 x (3x3 conv + BatchNorm scale/bias) + Dense(3*3*128 -> 128)
    assert models.count_params(shapes["params"]) == 9 * 128 + 3 * 9 * 128 * 128 + 4 * 2 * 128 + 1152 * 128 + 128


def test_gpu_runs_script_refuses_bad_usage_and_marks_a_failed_run_without_stopping(tmp_path):
    # The GPU recipe gets one 15-minute device budget: a typo must fail at once, and a failed run
    # must leave its archive and a FAILED line and let the next run go on (BUILD_NOTES, "GPU recipe").
    script = os.path.join(REPO, "experiments", "gpu_runs.sh")
    for args in ([], ["lakes"], ["lake", "bench", "--only=knn"]):
        r = subprocess.run(["bash", script, *args], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "usage:" in r.stderr, (args, r.stderr)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(out), WORK=str(tmp_path / "work"),
               SIAMESE_DATA_DIR=str(tmp_path / "no-data"), PYTHONPATH=REPO)
    out.mkdir()
    (out / "koch-s0.tar.gz").write_bytes(b"an earlier call's good run")  # a kept $OUT (the default runs/gpu)
    r = subprocess.run(["bash", script, "koch", "bench"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    # A failed run's archive has a name of its own: it replaced the good one of an earlier call.
    assert sorted(os.listdir(out)) == ["bench.FAILED.tar.gz", "koch-s0.FAILED.tar.gz", "koch-s0.tar.gz", "summary.txt"]
    assert (out / "koch-s0.tar.gz").read_bytes() == b"an earlier call's good run"
    lines = (out / "summary.txt").read_text().splitlines()
    assert lines[0].startswith("devices:") and lines[1].startswith("koch-s0: FAILED (exit 2")
    assert lines[2].startswith("bench: FAILED (exit 2")


def test_every_build_notes_passage_the_readme_names_is_in_build_notes():
    """README sends readers to BUILD_NOTES by a quoted name ("Memory", "Run EMA"): each must be found
    there (README pointed at "P(same) on pairs never seen", which BUILD_NOTES never had)."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = " ".join(f.read().split())
    with open(os.path.join(REPO, "BUILD_NOTES.md"), encoding="utf-8") as f:
        notes = " ".join(f.read().split())
    refs = re.findall(r'BUILD_NOTES(?:\.md)?[,:]? ((?:"[^"]+"(?:,? (?:and |or )?)?)+)', readme)
    names = [name for ref in refs for name in re.findall(r'"([^"]+)"', ref)]
    assert len(names) >= 10, names
    assert [name for name in names if name not in notes] == []


def test_configs_load_from_a_path_with_a_colon_as_every_windows_path_has(tmp_path):
    """ml_collections reads what follows the first ':' of --config as the config's argument. On
    Windows every absolute path has one (`C:\\...`): the installed default config read as the file
    `C`, so every `siamese-train` (`--loss=triplet`, `--config=mnist_pairs`) failed at once with
    "bad --config override or file: OSError: ... No such file or directory: '...C'". Emulated with
    the package reached through a folder named `C:` (a symlink, so __file__ carries the ':')."""
    site = tmp_path / "C:" / "site"
    site.mkdir(parents=True)
    (site / "siamese_jax").symlink_to(os.path.join(REPO, "siamese_jax"))
    (site / "mine.py").write_text("from siamese_jax.configs.default import get_config\n")
    code = (
        "import os, sys\n"
        "from siamese_jax import cli\n"
        "from siamese_jax.cli import train\n"
        "assert ':' in cli.DEFAULT_CONFIG, cli.DEFAULT_CONFIG\n"
        "for args in ([], ['--config=mnist_pairs'], [f'--config={os.getcwd()}/mine.py:mnist']):\n"
        "    train.FLAGS.unparse_flags()\n"
        "    train.FLAGS(cli.resolve_config_argument(['siamese-train', *args]))\n"
        "    print(train.resolve_config().dataset)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], cwd=site, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-1500:]
    assert r.stdout.split() == ["omniglot", "mnist", "mnist"]


def test_a_config_path_with_a_colon_that_cannot_be_made_relative_is_one_line(tmp_path, monkeypatch, capsys):
    from siamese_jax import cli

    folder = tmp_path / "D:"
    folder.mkdir()
    (folder / "mine.py").write_text("from siamese_jax.configs.default import get_config\n")
    # A file on another drive than the current folder's: relpath raises (Windows), no ':'-free form.
    monkeypatch.setattr(cli.os.path, "relpath", lambda path: (_ for _ in ()).throw(ValueError("other drive")))
    with pytest.raises(SystemExit) as e:
        cli.resolve_config_argument([f"--config={folder}/mine.py:mnist"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ml_collections reads what follows the first ':'" in err and "drive" in err


def test_a_missing_config_file_given_with_forward_slashes_on_windows_is_an_error_not_a_shipped_config(monkeypatch, capsys):
    # Windows separates paths with "\\" and also accepts "/" (os.altsep): `--config=my/dir/mnist_pairs.py`
    # with a typo in the folder quietly trained the shipped mnist_pairs there (the port review of 2026-12-07).
    from siamese_jax import cli

    monkeypatch.setattr(cli.os, "sep", "\\")
    monkeypatch.setattr(cli.os, "altsep", "/")
    with pytest.raises(SystemExit) as e:
        cli.resolve_config_argument(["--config=no/such/dir/mnist_pairs.py"])
    assert e.value.code == 2 and "no such file (shipped configs:" in capsys.readouterr().err
    (resolved,) = cli.resolve_config_argument(["--config=mnist_pairs"])  # a bare name still finds it
    assert resolved.endswith("mnist_pairs.py")
