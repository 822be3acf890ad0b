"""Command-line tools for a trained model: compare, embed, search, calibrate.

    siamese-compare a.png b.png [--model pretrained|WORKDIR|FILE]   exit 0 same, 1 different, 2 error
    siamese-embed FOLDER --out index.npz [--skip_unreadable] [--model ...]
    siamese-search index.npz query.png -k 5 [--sheet out.png]
    siamese-calibrate FOLDER --model WORKDIR|FILE [--far 0.01] [--out model.msgpack]

(in a checkout also `python -m experiments.compare`, `.embed`, `.search`, `.calibrate`).

Every error (missing file, not an image, wrong index, unusable model file, and unexpected ones)
is one `error:` line and exit code 2; exit code 1 is only `compare`'s DIFFERENT. Ctrl-C or SIGTERM
stops a command with one line and exit code 130, and a file it was writing is not written (an older
one is kept). `--verbose` (or SIAMESE_TRACEBACK=1) prints the traceback of an unexpected error.
File names that are not valid in the output encoding are printed with backslash escapes.
"""
from __future__ import annotations

import argparse
import os
import sys

from siamese_jax import console

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints usage + message by default)
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _user_errors():
    from siamese_jax.checkpoints import CheckpointError
    from siamese_jax.images import ImageError
    from siamese_jax.index import IndexError_
    from siamese_jax.inference import ModelError

    return (ImageError, ModelError, IndexError_, CheckpointError, ValueError, OSError)


def _run(fn, argv):
    console.quiet_when_reader_leaves()  # `siamese-search ... | head -1` ends as it would have, quietly
    argv = console.expand_home(argv)
    verbose = "--verbose" in argv
    # SIGTERM (`timeout`, a job's end) as a Ctrl-C: one line and 130, and an output being written is
    # not left as a temporary file.
    return console.guarded(lambda: fn([a for a in argv if a != "--verbose"]), _user_errors, verbose=verbose,
                           signals=console.INTERRUPTS)


def _add_verbose(p):
    p.add_argument("--verbose", action="store_true", help="print the traceback of an unexpected error")


def _model_arg(p):
    p.add_argument("--model", default="pretrained",
                   help="'pretrained' (shipped Omniglot model), 'pretrained-mnist' (shipped MNIST digits model), "
                        "a training workdir, or a .msgpack model file")
    _add_verbose(p)


# ------------------------------------------------------------------------------------------------
def _compare(argv):
    p = _Parser(prog="siamese-compare", description="Are these two images the same class?", epilog=(
        "P(same) is the model's calibration: a logistic fit of the distance on labelled pairs, which "
        "siamese-calibrate and siamese-export (the shipped models) draw half same-class, half "
        "different-class. It is the probability for a pair drawn from such a 50/50 mix; where same-class "
        "pairs are rarer, say 1 in 20, multiply its odds P/(1-P) by 1/19."))
    p.add_argument("image_a")
    p.add_argument("image_b")
    _model_arg(p)
    args = p.parse_args(argv)
    from siamese_jax.images import read_image
    from siamese_jax.inference import load_model

    read_image(args.image_a), read_image(args.image_b)  # fail on bad input before loading the model
    model = load_model(args.model)
    v = model.compare(args.image_a, args.image_b)
    print(f"distance      {v.distance:.4f}")
    print(f"P(same)       {v.probability:.3f}")
    print(f"threshold     {v.threshold:.4f} ({model.calibration.method}, calibrated on {model.calibration.num_pairs} pairs)")
    print(f"verdict       {'SAME' if v.same else 'DIFFERENT'}")
    return 0 if v.same else 1


def _embed(argv):
    p = _Parser(prog="siamese-embed", description="Embed every image of a folder into a searchable index (.npz).")
    p.add_argument("folder")
    p.add_argument("--out", required=True, help="index file to write (.npz)")
    p.add_argument("--skip_unreadable", action="store_true",
                   help="leave out files that cannot be read (a warning line each) instead of stopping at the first")
    _model_arg(p)
    args = p.parse_args(argv)
    from siamese_jax.files import check_output_file
    from siamese_jax.images import ImageError, list_images
    from siamese_jax.index import build_index
    from siamese_jax.inference import load_model

    check_output_file(args.out)

    paths = list_images(args.folder)
    model = load_model(args.model)
    skipped = []

    def skip(message):
        skipped.append(message)
        print(console.display(f"warning: skipped {message}"), file=sys.stderr)

    try:
        index = build_index(model, paths, skip_unreadable=skip if args.skip_unreadable else None)
    except ImageError as e:
        hint = "" if args.skip_unreadable else " (--skip_unreadable indexes the other images)"
        raise ImageError(f"{e}{hint}") from None
    index.save(args.out)
    left_out = f", {len(skipped)} unreadable left out" if skipped else ""
    print(console.display(f"indexed {len(index)} images ({index.embeddings.shape[1]}-d) from {args.folder}{left_out} -> {args.out}"))
    return 0


def _search(argv):
    p = _Parser(prog="siamese-search", description=(
        "The k images of an index nearest to each query image (the index and the model are loaded once "
        "for all of them)."))
    p.add_argument("index")
    p.add_argument("image", nargs="+")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--sheet", help="also write a contact-sheet PNG of the query and its neighbours")
    _model_arg(p)
    args = p.parse_args(argv)
    if args.k < 1:
        p.error("-k must be at least 1")
    if args.sheet:
        from siamese_jax.files import check_output_file

        if len(args.image) > 1:
            p.error(f"--sheet draws one query's neighbours; {len(args.image)} images were given")
        check_output_file(args.sheet, "--sheet")
    from siamese_jax.images import read_image
    from siamese_jax.index import EmbeddingIndex, check_compatible
    from siamese_jax.inference import load_model

    index = EmbeddingIndex.load(args.index)
    for image in args.image:  # every query readable before the model loads: a bad path fails at once
        read_image(image)
    model = load_model(args.model)
    check_compatible(index, model, args.index)
    dists, idx = index.search(model.embed(args.image), args.k)
    for q, image in enumerate(args.image):
        if len(args.image) > 1:  # one block per query, headed by it (one query: the ranks alone, as before)
            if q:
                print()
            print(console.display(f"query {image}"))
        for rank, (d, i) in enumerate(zip(dists[q], idx[q]), 1):
            print(console.display(f"{rank:>3}  {d:8.4f}  {index.file_path(i)}"))
    missing = sorted({int(i) for i in idx.ravel() if not os.path.exists(index.file_path(i))})
    if missing:  # (the sheet draws them as grey tiles)
        print(console.display(f"note: {len(missing)} of the neighbours' files are not where the index records them "
                              f"(e.g. {index.file_path(missing[0])}): moved or removed since it was built, or it "
                              f"was built on another machine"), file=sys.stderr)
    if args.sheet:
        from siamese_jax import plots

        threshold = model.calibration.threshold if model.calibration is not None else None
        if model.stale_calibration:  # the sheet then shows distances only; say why, as compare does
            print(console.display(f"note: no verdicts on the sheet: {model.stale_calibration}"), file=sys.stderr)
        plots.plot_neighbours(args.sheet, args.image[0], [index.file_path(i) for i in idx[0]], dists[0], threshold)
        print(console.display(f"contact sheet -> {args.sheet}"))
    return 0


def _calibrate(argv):
    p = _Parser(prog="siamese-calibrate", description=(
        "Choose the same/different distance threshold on labelled pairs drawn from FOLDER, whose "
        "sub-folders are the classes (images in one sub-folder are the same class)."))
    p.add_argument("folder")
    _model_arg(p)
    p.add_argument("--far", type=float, default=None, help="target false-accept rate (default: max accuracy)")
    p.add_argument("--pairs", type=int, default=2000, help="number of pairs (half same, half different)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="model file to write (default: calibration.json in a workdir, or the model file itself)")
    args = p.parse_args(argv)
    if args.far is not None and not 0 < args.far < 1:
        p.error("--far must be between 0 and 1")
    if args.pairs < 2:
        p.error(f"--pairs must be at least 2 (half same-class, half different-class pairs); got {args.pairs}")
    from siamese_jax.inference import PRETRAINED_FILES

    if args.model in PRETRAINED_FILES and not args.out:
        p.error(f"--out is required to calibrate the shipped {args.model} model (it is not overwritten)")
    if args.out:
        from siamese_jax.files import check_output_file

        check_output_file(args.out)
    elif os.path.exists(args.model):
        from siamese_jax.files import folder_not_writable

        # Before any work: a shared model folder or file someone else owns (read-only here) failed
        # only at the final write, and the error did not say that --out writes elsewhere.
        target = os.path.join(args.model, "calibration.json") if os.path.isdir(args.model) else args.model
        why = folder_not_writable(os.path.dirname(os.path.abspath(target)))
        if why:
            raise PermissionError(f"cannot write {target} ({why}): give --out=<new model file> to write the "
                                  f"calibrated model elsewhere")
    import numpy as np

    from siamese_jax.files import atomic_write_json
    from siamese_jax.images import list_images
    from siamese_jax.inference import load_model

    paths = list_images(args.folder)
    classes = [os.path.relpath(os.path.dirname(q), args.folder) for q in paths]
    names, labels = np.unique(classes, return_inverse=True)
    if len(names) < 2 or np.bincount(labels).max() < 2:
        raise ValueError(f"{args.folder}: needs at least 2 class sub-folders and one with 2+ images")
    model = load_model(args.model)
    from siamese_jax.evaluation import balanced_pairs

    a, b, same = balanced_pairs(labels, args.pairs, args.seed)
    # A small folder has fewer distinct pairs than --pairs: balanced_pairs draws them again, and the
    # line below said "accuracy 1.000 on 2000 pairs" for a folder of 2 classes x 2 images (6 pairs),
    # whose P(same) then said 1.000 for two different characters.
    # Counted per half: over both, 100 classes x 2 images gave ~1,070 distinct pairs of 2,000 and no
    # warning, though its same-class half repeats the same 100 pairs ten times each.
    thin = []
    for kind, half in (("same-class", same), ("different-class", ~same)):
        drawn = int(half.sum())
        distinct = len({(min(i, j), max(i, j)) for i, j in zip(a[half].tolist(), b[half].tolist())})
        if distinct < drawn / 2:
            thin.append(f"{distinct} distinct {kind} pairs, drawn {drawn} times")
    if thin:
        print(console.display(f"warning: {args.folder} gives only {' and '.join(thin)}: the threshold, its accuracy "
                              f"and P(same) rest on those (add images or classes)"), file=sys.stderr)
    # Only the images the pairs use are read and embedded (2,000 pairs touch at most 4,000 of a
    # folder's images; embedding all 50,000 took 1.8 GB and the time of all of them).
    used, where_used = np.unique(np.concatenate([a, b]), return_inverse=True)
    emb = model.embed([paths[i] for i in used])
    a, b = where_used[:len(a)], where_used[len(a):]
    cal = model.calibrate(np.linalg.norm(emb[a] - emb[b], axis=-1), same, args.far)
    if os.path.isdir(args.model) and not args.out:
        # Which weights it fits: a later checkpoint of the workdir does not inherit it (inference._load_workdir).
        atomic_write_json(os.path.join(args.model, "calibration.json"),
                          dict(cal.__dict__, model_fingerprint=model.fingerprint(), checkpoint_step=model.provenance.get("step")))
        where = os.path.join(args.model, "calibration.json")
    else:
        from siamese_jax.images import READING

        where = args.out or args.model
        # Where its threshold comes from (an exported file said "the run's validation data" after
        # being calibrated on a folder), and how the folder's files were read: a version that reads
        # them otherwise does not use the threshold (`inference.load_model`).
        model.provenance.update(calibrated_on=f"{cal.num_pairs} pairs of {len(names)} classes in "
                                              f"{os.path.abspath(args.folder)}", images_read_as=READING)
        model.save(where)
    print(console.display(f"threshold {cal.threshold:.4f} ({cal.method}) on {cal.num_pairs} pairs from {len(names)} classes: "
                          f"accuracy {cal.accuracy:.3f}, false-accept rate {cal.false_accept_rate:.3f} -> {where}"))
    return 0


def compare_main(argv=None):
    console.exit_process(_run(_compare, sys.argv[1:] if argv is None else argv))


def embed_main(argv=None):
    console.exit_process(_run(_embed, sys.argv[1:] if argv is None else argv))


def search_main(argv=None):
    console.exit_process(_run(_search, sys.argv[1:] if argv is None else argv))


def calibrate_main(argv=None):
    console.exit_process(_run(_calibrate, sys.argv[1:] if argv is None else argv))
