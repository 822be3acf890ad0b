"""Re-check model selection on more validation data: the one-shot accuracy of each workdir's chosen
checkpoint on fresh within-alphabet 20-way 1-shot episodes of the held-out *background* validation
alphabets (Omniglot) — not the `val_episodes` episodes that chose the checkpoint, and never the
evaluation alphabets. For telling apart two configs whose validation curves tie (BUILD_NOTES,
"Augmenting make train", run J).

    python -m experiments.validation_recheck --workdir=runs/a --workdir=runs/b [--episodes=2000]
    python -m experiments.validation_recheck --workdir=runs/a --test_time_shifts=none,cross5,square9
    python -m experiments.validation_recheck --workdir=runs/a --workdir=runs/b --ensemble
    python -m experiments.validation_recheck --workdir=pretrained --workdir=old.msgpack --ensemble

`--workdir` also takes an exported model file or a shipped model's name (`pretrained`): its
metadata's config says which alphabets were held out.

Prints, per workdir (and test-time shift set: `siamese_jax.test_time`; default the run's own), the
checkpoint step and the mean accuracy with its 95% interval over the episodes of every seed pooled
(`episodes` episodes of each of the `seeds`; default 2 x 2000, seeds 4242 and 4343). Shift sets of
one workdir are scored on the same episodes.
`--ensemble` also scores the workdirs as one model (embeddings concatenated) on those episodes.
"""
import functools
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import flags, logging  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("workdir", [], "A training workdir, an exported model file or a shipped model's "
                          "name, e.g. pretrained (repeatable).")
flags.DEFINE_integer("episodes", 2000, "Episodes per seed.")
flags.DEFINE_list("seeds", ["4242", "4343"], "Episode seeds (not the training run's validation seed, seed + 777).")
flags.DEFINE_string("data_dir", None, "Data root (default: $SIAMESE_DATA_DIR).")
flags.DEFINE_list("test_time_shifts", [], "Test-time shift sets to score (default: the run's config's).")
flags.DEFINE_bool("ensemble", False, "Also score all workdirs together: their embeddings concatenated.")


@functools.lru_cache(maxsize=None)  # the split check and the scoring read each workdir once
def _validation_split(workdir: str, test_time_shifts=None):
    """The workdir's chosen checkpoint as a model and its validation images, read but not embedded
    (an --ensemble of runs on different splits is refused before anything is embedded)."""
    import numpy as np

    from siamese_jax import inference, sampling
    from siamese_jax import input_pipeline as ip

    overrides = {"archive_dir": FLAGS.data_dir} if FLAGS.data_dir else {}
    if test_time_shifts:
        overrides["test_time_shifts"] = test_time_shifts
    try:  # a workdir's chosen checkpoint, a model file or a shipped model, on the data mesh
        model, step = inference.load_run(workdir, overrides)
    except inference.ModelError as e:
        raise ValueError(str(e)) from None  # one error line and exit 2 (cli.run_app)
    config = model.config
    val_ds = ip.validation_dataset(config, image_size=config.image_size)
    val_dds = sampling.to_device_dataset(val_ds, image_size=config.image_size)
    held_out = (", ".join(val_ds.alphabet_names[a] for a in np.unique(val_ds.alphabets))
                if val_ds.alphabets is not None and val_ds.alphabet_names else f"{len(val_ds)} {config.dataset} images")
    return {"model": model, "config": config, "labels": np.asarray(val_ds.labels), "val_dds": val_dds,
            "step": step, "test_time_shifts": config.get("test_time_shifts", "none"), "held_out": held_out}


@functools.lru_cache(maxsize=None)  # --ensemble reuses each workdir's embeddings
def _embed_validation(workdir: str, test_time_shifts=None):
    """The workdir's chosen checkpoint's embeddings of its validation images (and what scoring needs)."""
    import numpy as np

    split = _validation_split(workdir, test_time_shifts)
    return dict(split, embeddings=np.asarray(split["model"].embed_u8(np.asarray(split["val_dds"].images))))


def check_same_split(workdirs) -> None:
    """--ensemble needs one validation split: checked before anything is scored (it used to fail
    only after printing each run's score, on splits that differ, as if they were comparable)."""
    import numpy as np

    first = _validation_split(workdirs[0])
    for wd in workdirs[1:]:
        e = _validation_split(wd)
        if not np.array_equal(e["labels"], first["labels"]):
            raise ValueError(f"--ensemble: {wd} holds out {e['held_out']} for validation, {workdirs[0]} holds out "
                             f"{first['held_out']}: one split is needed (the shipped `pretrained` holds out "
                             f"Balinese, Grantha, as runs of --config=omniglot_pretrained do)")


def _score(embedded: dict, emb, episodes: int, seeds) -> dict:
    """Mean one-shot accuracy of embeddings `emb` on the fresh within-alphabet 20-way 1-shot episodes."""
    import jax
    import numpy as np

    from siamese_jax import evaluation, sampling

    val_dds = embedded["val_dds"]
    n_way = min(20, int(val_dds.class_count.shape[0]))
    within = embedded["config"].dataset == "omniglot" and val_dds.max_classes_per_alphabet >= n_way
    accs = []
    for seed in seeds:
        support, query = sampling.sample_episode_indices(jax.random.PRNGKey(int(seed)), val_dds, episodes,
                                                         n_way, 1, 1, within_alphabet=within)
        accs.append(evaluation.one_shot_accuracy(support, query, embeddings=emb))
    summary = evaluation.summarize_accuracies(np.concatenate(accs))  # the ± of results.json's rows
    return {"episodes": summary["num_episodes"], "accuracy": summary["mean"], "ci95": summary["ci95"]}


def recheck(workdir: str, episodes: int, seeds, test_time_shifts=None) -> dict:
    embedded = _embed_validation(workdir, test_time_shifts)
    return {"step": embedded["step"], "test_time_shifts": embedded["test_time_shifts"],
            **_score(embedded, embedded["embeddings"], episodes, seeds)}


def recheck_ensemble(workdirs, episodes: int, seeds) -> dict:
    """The workdirs' embeddings concatenated (so squared distances add up: every model votes with its
    own scale), scored on the same episodes as each model alone. The runs must share one validation
    split (same dataset, alphabets and seed), whatever their input sizes."""
    import numpy as np

    check_same_split(workdirs)
    embedded = [_embed_validation(wd) for wd in workdirs]
    emb = np.concatenate([e["embeddings"] for e in embedded], axis=1)
    return {"steps": [e["step"] for e in embedded], **_score(embedded[0], emb, episodes, seeds)}


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax's restore chatter
    from siamese_jax import cli

    if not FLAGS.workdir:
        cli.fail("give at least one --workdir")
    if FLAGS.episodes < 1:
        cli.fail(f"--episodes={FLAGS.episodes}: must be at least 1")
    if FLAGS.ensemble:
        check_same_split(FLAGS.workdir)
    splits = {}
    for wd in FLAGS.workdir:
        splits.setdefault(_validation_split(wd)["held_out"], []).append(wd)
    if len(splits) > 1:  # each run is scored on its own validation alphabets
        print("note: these runs hold out different validation alphabets, so their scores are not comparable: "
              + "; ".join(f"{', '.join(wds)}: {held}" for held, wds in splits.items()), flush=True)
    for wd in FLAGS.workdir:
        for shifts in FLAGS.test_time_shifts or [None]:
            r = recheck(wd, FLAGS.episodes, FLAGS.seeds, shifts)
            print(f"{wd}: step {r['step']}, shifts {r['test_time_shifts']}, {r['episodes']} episodes, "
                  f"validation one-shot accuracy {r['accuracy']:.4f} ± {r['ci95']:.4f}", flush=True)
    if FLAGS.ensemble:
        r = recheck_ensemble(FLAGS.workdir, FLAGS.episodes, FLAGS.seeds)
        print(f"ensemble of {len(FLAGS.workdir)} (steps {r['steps']}, each run's own shifts), {r['episodes']} "
              f"episodes, validation one-shot accuracy {r['accuracy']:.4f} ± {r['ci95']:.4f}", flush=True)


if __name__ == "__main__":
    from siamese_jax import cli

    cli.run_app(main)
