"""The loss comparison: every Siamese loss on the same encoder, data and budget, several seeds each.

    python -m experiments.loss_sweep [--quick] [--datasets=omniglot,mnist] [--seeds=0,1,2]
        [--steps=3000] [--out=runs/loss_sweep] [--rows=contrastive,batch_hard,...]

One training run per (dataset, row, seed), each `python -m experiments.train` in its own process
(a clean JAX runtime each), with the dataset's default config and only the loss-specific keys
changed: the encoder, input size, optimizer, schedule, steps and *images per step* are the same for
every row (pairs carry 2 images, triplets 3, a P x K batch P*K). Each run selects its checkpoint on
the background validation alphabets (MNIST: the held-out tail of the train split) as `make train`
does; evaluation data is touched once per run, by the run's own final evaluation.

Runs whose `results.json` exists are not run again, so an interrupted sweep resumes where it stopped;
a run in `--out` started with other settings (another --steps or --extra, or a --quick run) is an
error, never averaged in or resumed.
At the end (and after every run) the sweep writes `<out>/sweep.json` (every run's numbers and the
per-row mean, sample standard deviation, min and max over seeds), `<out>/table.md` and
`<out>/loss_comparison.png`.

`--report_only`: train nothing, rewrite the outputs from the finished runs of `--datasets` (e.g. after
sweeping omniglot and mnist in two invocations).

`--quick`: one seed, 300 steps, 100 evaluation episodes; a smoke run of the whole pipeline (minutes),
whose numbers mean nothing (written to runs/loss_sweep_quick unless --out is given).
"""
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time

from absl import flags

_WINDOWS = os.name == "nt"  # a module constant, so that a test can take the Windows path

FLAGS = flags.FLAGS


QUICK_OUT_FROM, QUICK_OUT = "runs/loss_sweep", "runs/loss_sweep_quick"


def define_flags():
    """The command-line flags, defined when run as a script, not on import: experiments.benchmark
    and experiments.loss_sweep both have --quick, and a test process imports both."""
    flags.DEFINE_bool("quick", False, "One seed, 300 steps, 100 evaluation episodes (a smoke run).")
    flags.DEFINE_list("datasets", ["omniglot"], "Datasets to sweep: omniglot, mnist.")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds (each row runs once per seed).")
    flags.DEFINE_list("rows", None, "Only these rows (default: all): " + ", ".join(r[0] for r in ROWS) + ".")
    flags.DEFINE_integer("steps", 3000, "Training steps of every run.")
    flags.DEFINE_string("out", QUICK_OUT_FROM, f"Directory for the runs, sweep.json, table.md and the plot "
                        f"(with --quick and no --out: {QUICK_OUT}).")
    flags.DEFINE_string("data_dir", None, "Data root (default: $SIAMESE_DATA_DIR).")
    flags.DEFINE_bool("report_only", False, "Train nothing: rewrite sweep.json, table.md and the plot from the finished runs.")
    flags.DEFINE_multi_string("extra", [], "A --config override for every run, as key=value (repeatable).")

# Each row: id, label, config overrides. The same images per step for every row of a dataset:
# Omniglot 128 (pairs 64 x 2; random triplets 42 x 3 = 126, the nearest multiple of 3 that two
# devices divide; P x K 32 x 4); MNIST 120 (pairs 60 x 2; triplets 40 x 3; P x K 10 x 12: 10 classes).
ROWS = (
    ("contrastive", "contrastive (Hadsell et al.)", {"loss": "contrastive"}),
    ("triplet_random", "triplet, random triplets", {"loss": "triplet", "triplet_selection": "random"}),
    ("triplet_online", "triplet, online (random positive, hardest negative)",
     {"loss": "triplet", "triplet_selection": "online"}),
    ("triplet_online_all", "triplet, online_all (every positive, hardest negative)",
     {"loss": "triplet", "triplet_selection": "online_all"}),
    ("batch_all", "batch-all", {"loss": "batch_all"}),
    ("batch_hard", "batch-hard", {"loss": "batch_hard"}),
    ("semihard", "semi-hard", {"loss": "semihard"}),
    ("prototypical", "prototypical (Snell et al.: softmax over the batch's class means)", {"loss": "prototypical"}),
    ("verification", "verification (Koch et al.: L1 + sigmoid, BCE)", {"loss": "verification"}),
    ("arcface", "ArcFace (Deng et al.: angular margin to learned class centres)",
     {"loss": "arcface", "l2_normalize": True}),
    ("multi_similarity", "multi-similarity (Wang et al.: mined pairs, soft-weighted cosines)",
     {"loss": "multi_similarity", "l2_normalize": True}),
)
BATCH = {  # dataset -> (pair rows, triplet rows, P, K)
    "omniglot": (64, 42, 32, 4),
    "mnist": (60, 40, 10, 12),
}
PAIR_ROWS = ("contrastive", "verification")


def run_overrides(dataset: str, row_id: str, seed: int, steps: int, quick: bool) -> dict:
    """The --config.* overrides of one run (on top of the dataset's default preset)."""
    overrides = dict(dict((r[0], r[2]) for r in ROWS)[row_id])
    pairs, triplets, p, k = BATCH[dataset]
    if row_id in PAIR_ROWS:
        overrides["batch_size"] = pairs
    elif row_id == "triplet_random":
        overrides["batch_size"] = triplets
    else:
        overrides.update(classes_per_batch=p, images_per_class=k)
    # No augmentation for any loss, at training or test time: the table was measured on the
    # unaugmented images with one view (before the Omniglot default's shifts + elastic field and its
    # 9-view test-time average), and a comparison of losses needs neither.
    overrides.update(seed=seed, num_steps=steps, plots=False, augment=False, test_time_shifts="none")
    if quick:
        overrides.update(eval_episodes=100, val_episodes=50, eval_every_steps=100, checkpoint_every_steps=100)
    return overrides


def images_per_step(dataset: str, row_id: str) -> int:
    pairs, triplets, p, k = BATCH[dataset]
    return 2 * pairs if row_id in PAIR_ROWS else 3 * triplets if row_id == "triplet_random" else p * k


def _flag_value(v) -> str:
    return str(v)


def _comparable(value):
    """A config value as config.json and a --config override both spell it: "(8,8)", (8, 8) and
    [8, 8] alike; "none" and "True" as what absl parses them to."""
    import ast

    if isinstance(value, str):
        if value.strip().lower() in ("true", "false", "t", "f"):  # as absl parses a boolean override
            return value.strip().lower() in ("true", "t")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    if isinstance(value, (list, tuple)):
        return [_comparable(v) for v in value]
    return value


def check_workdir_matches(workdir: str, dataset: str, overrides: dict, extra: list) -> None:
    """A sweep resumes a workdir (or counts its results.json) only if the run there was started with
    this sweep's settings: a `--quick` run, or one of another --steps or --extra, in the same --out
    would otherwise be averaged into the table, or resumed with its own schedule."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        have = json.load(f)
    want = {"dataset": dataset, **overrides, **dict(e.split("=", 1) for e in extra)}

    def value_of(key):  # "margins.triplet" is config.json's {"margins": {"triplet": ...}}
        node = have
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    differ = [f"{k}={value_of(k)!r} (this sweep: {v!r})" for k, v in want.items()
              if _comparable(value_of(k)) != _comparable(v)]
    if differ:
        from siamese_jax import console

        console.fail(f"{workdir} holds a run with other settings: {', '.join(differ)}; "
                     f"give this sweep another --out (or remove that run)")


def run_training(cmd: list, log) -> int:
    """Runs one training process to its end; its exit code. A Ctrl-C or SIGTERM to the sweep (an
    interrupt here) is passed on as SIGTERM, on which the training saves a checkpoint and stops, and
    waited for, so that the sweep run again resumes it. `subprocess.call` killed it instead (SIGKILL:
    the steps since its last save lost) and, on a SIGTERM to the sweep alone, which used to end the
    sweep at once, left it training on without its parent. On Windows nothing is sent: there
    `send_signal(SIGTERM)` is TerminateProcess (the same loss), and the console's Ctrl-C has reached
    the training already (one console, one process group), which saves on it."""
    with subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT) as training:
        try:
            return training.wait()
        except KeyboardInterrupt:
            if not _WINDOWS:
                training.send_signal(signal.SIGTERM)
            training.wait()
            raise


def run_one(workdir: str, dataset: str, overrides: dict, extra: list, data_dir) -> float:
    cmd = [sys.executable, "-m", "experiments.train", f"--dataset={dataset}", f"--workdir={workdir}"]
    if data_dir:
        cmd.append(f"--data_dir={data_dir}")
    cmd += [f"--config.{k}={_flag_value(v)}" for k, v in overrides.items()]
    cmd += [f"--config.{e}" for e in extra]
    os.makedirs(workdir, exist_ok=True)
    t = time.time()
    with open(os.path.join(workdir, "sweep_log.txt"), "a") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        rc = run_training(cmd, log)
    if rc != 0:
        raise RuntimeError(f"run failed (exit {rc}); see {os.path.join(workdir, 'sweep_log.txt')}")
    return time.time() - t


def _best_validation(workdir: str, step: int):
    from siamese_jax.files import read_jsonl  # (a torn last line, from a killed leg, is skipped)

    for row in read_jsonl(os.path.join(workdir, "metrics.jsonl")):
        if row.get("step") == step:
            for key, value in row.items():
                if key.startswith("val_"):
                    return value
    return None


def metrics_of(dataset: str, results: dict) -> dict:
    """The numbers the table and the plot report for one run: accuracies in percent, ROC-AUC as a fraction."""
    if dataset == "omniglot":
        ep = results["episodes"]
        return {
            "lake_20_runs": 100 * results["lake_20_runs"]["accuracy"],
            "unstructured_20w1s": 100 * ep["unstructured/20-way-1-shot"]["mean"],
            "within_alphabet_20w1s": 100 * ep["within_alphabet/20-way-1-shot"]["mean"],
        }
    v = results["verification"]
    return {"mnist_test_pair_accuracy": 100 * v["test_accuracy"], "mnist_roc_auc": v["roc_auc"]}


def summarize(values: list) -> dict:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def collect(out: str, datasets, row_ids, seeds) -> dict:
    """Reads every finished run under `out` into per-run records and per-row summaries."""
    sweep = {"runs": [], "summary": {}}
    for dataset in datasets:
        for row_id in row_ids:
            per_metric = {}
            for seed in seeds:
                workdir = os.path.join(out, dataset, row_id, f"seed{seed}")
                path = os.path.join(workdir, "results.json")
                if not os.path.exists(path):
                    continue
                with open(path) as f:
                    results = json.load(f)
                m = metrics_of(dataset, results)
                record = {"dataset": dataset, "row": row_id, "seed": seed, **m,
                          "checkpoint_step": results.get("checkpoint_step"),
                          "best_validation": _best_validation(workdir, results.get("checkpoint_step")),
                          "train_seconds": results.get("train_seconds"),
                          "num_steps": results.get("num_steps")}
                sweep["runs"].append(record)
                for key, value in m.items():
                    per_metric.setdefault(key, []).append(value)
            if per_metric:
                sweep["summary"][f"{dataset}/{row_id}"] = {k: summarize(v) for k, v in per_metric.items()}
    return sweep


def markdown_table(sweep: dict, datasets, row_ids, steps: int) -> str:
    labels = {r[0]: r[1] for r in ROWS}
    lines = []
    for dataset in datasets:
        if dataset == "omniglot":
            cols = [("lake_20_runs", "Lake's 20 runs"), ("unstructured_20w1s", "unstructured 20-way 1-shot"),
                    ("within_alphabet_20w1s", "within-alphabet 20-way 1-shot")]
        else:
            cols = [("mnist_test_pair_accuracy", "MNIST test pair accuracy")]
        # The runs' own step counts (datasets may be swept with different --steps), else --steps.
        run_steps = sorted({r["num_steps"] for r in sweep["runs"] if r["dataset"] == dataset and r.get("num_steps")})
        steps_text = "/".join(str(s) for s in run_steps) if run_steps else str(steps)
        lines.append(f"**{dataset}**, {steps_text} steps, mean ± sd over seeds (min–max):\n")
        lines.append("| loss | images/step | seeds | " + " | ".join(c[1] for c in cols) + " |")
        lines.append("| --- | ---: | ---: | " + " | ".join("---:" for _ in cols) + " |")
        for row_id in row_ids:
            s = sweep["summary"].get(f"{dataset}/{row_id}")
            if not s:
                continue
            n = s[cols[0][0]]["n"]
            cells = [f"{s[k]['mean']:.2f} ± {s[k]['sd']:.2f} ({s[k]['min']:.2f}–{s[k]['max']:.2f})" for k, _ in cols]
            lines.append(f"| {labels[row_id]} | {images_per_step(dataset, row_id)} | {n} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(sweep: dict, datasets, row_ids, path: str) -> None:
    """One panel per protocol, one row per loss: each seed a dot, the mean a bar with its value.

    Dots rather than bars: the accuracies span ~50-100%, and a bar cut off at 50 would draw 95% as
    twice 72%. The best mean of each panel (and any that print the same) is drawn in its own colour."""
    from matplotlib import rc_context
    from matplotlib.figure import Figure

    from siamese_jax.files import atomic_open

    panels = []
    if "omniglot" in datasets:
        panels += [("omniglot", "lake_20_runs", "Omniglot\nLake's 20 runs"),
                   ("omniglot", "unstructured_20w1s", "Omniglot\nunstructured 20-way 1-shot"),
                   ("omniglot", "within_alphabet_20w1s", "Omniglot\nwithin-alphabet 20-way 1-shot")]
    if "mnist" in datasets:
        panels.append(("mnist", "mnist_test_pair_accuracy", "MNIST\ntest pair accuracy"))
    # A dataset with no finished run yet has no panel (seeds are the outer loop, so a sweep of
    # omniglot,mnist writes its outputs after each Omniglot run of seed 0 before any MNIST run).
    panels = [p for p in panels if any(run["dataset"] == p[0] for run in sweep["runs"])]
    if not panels:
        return
    labels = {r[0]: r[1].split(" (")[0] for r in ROWS}  # the table has the long names
    ids = [r for r in row_ids if any(f"{d}/{r}" in sweep["summary"] for d, _, _ in panels)]
    seeds = sorted({run["seed"] for run in sweep["runs"] if "seed" in run})
    with rc_context({"font.size": 10, "axes.spines.top": False, "axes.spines.right": False}):
        fig = Figure(figsize=(max(3.3 * len(panels) + 1.6, 6.5), 0.36 * len(ids) + 1.7), dpi=110, layout="constrained")
        axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
        for ax, (dataset, key, title) in zip(axes, panels):
            means = {r: sweep["summary"][f"{dataset}/{r}"][key]["mean"] for r in ids if f"{dataset}/{r}" in sweep["summary"]}
            top = f"{max(means.values()):.1f}" if means else None
            for i, r in enumerate(ids):
                if r not in means:
                    continue
                best = f"{means[r]:.1f}" == top
                colour = "#c44e52" if best else "#4c72b0"
                pts = [run[key] for run in sweep["runs"] if run["dataset"] == dataset and run["row"] == r
                       and isinstance(run.get(key), (int, float)) and math.isfinite(run[key])]
                ax.plot(pts, [i] * len(pts), "o", color=colour, alpha=0.45, markersize=5, markeredgewidth=0)
                ax.plot([means[r]] * 2, [i - 0.3, i + 0.3], color=colour, lw=2.5)
                ax.annotate(f"{means[r]:.1f}", (max(pts + [means[r]]), i), textcoords="offset points", xytext=(6, 0),
                            ha="left", va="center", fontsize=8.5, color=colour, fontweight="bold" if best else "normal")
            values = [run[key] for run in sweep["runs"] if run["dataset"] == dataset and run["row"] in means
                      and isinstance(run.get(key), (int, float)) and math.isfinite(run[key])]
            lo, hi = min(values + list(means.values())), max(values + list(means.values()))
            pad = max(1.0, 0.06 * (hi - lo))
            ax.set_xlim(lo - pad, hi + 3 * pad)  # room for the numbers right of the dots
            ax.set_xticks([t for t in ax.get_xticks() if lo - pad <= t <= min(hi + 3 * pad, 100.0)])  # no "101%"
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("accuracy (%)")
            ax.grid(axis="x", alpha=0.3)
        axes[0].set_yticks(range(len(ids)))
        axes[0].set_yticklabels([labels.get(r, r) for r in ids])
        axes[0].set_ylim(len(ids) - 0.5, -0.7)
        fig.suptitle("Siamese losses: same encoder, data and budget\n"
                     f"(dots: {len(seeds)} seed{'s' if len(seeds) != 1 else ''}; bar and number: their mean; "
                     "red: the best mean)", fontsize=11)
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png", dpi=110, facecolor="white")


def write_outputs(out, datasets, row_ids, seeds, steps) -> dict:
    from siamese_jax.files import atomic_open, atomic_write_json

    sweep = collect(out, datasets, row_ids, seeds)
    sweep["steps"] = steps
    sweep["seeds"] = seeds
    atomic_write_json(os.path.join(out, "sweep.json"), sweep)
    with atomic_open(os.path.join(out, "table.md")) as f:
        f.write(markdown_table(sweep, datasets, row_ids, steps))
    if sweep["runs"]:
        plot(sweep, datasets, row_ids, os.path.join(out, "loss_comparison.png"))
    return sweep


def main(argv):
    del argv
    from siamese_jax import console

    known = [r[0] for r in ROWS]
    row_ids = FLAGS.rows or known
    bad = [r for r in row_ids if r not in known]
    if bad:
        console.fail(f"--rows: unknown {', '.join(bad)}; expected some of {', '.join(known)}")
    for d in FLAGS.datasets:
        if d not in BATCH:
            console.fail(f"--datasets: unknown {d!r}; expected omniglot and/or mnist")
    try:
        seeds = [int(s) for s in FLAGS.seeds]
    except ValueError:
        console.fail(f"--seeds: expected integers, got {','.join(FLAGS.seeds)}")
    steps = FLAGS.steps
    if FLAGS.quick:
        seeds, steps = seeds[:1], 300
    out = FLAGS.out
    if FLAGS.quick and not FLAGS["out"].present:
        out = QUICK_OUT  # the smoke run's numbers mean nothing: never in the real sweep's directory
    for e in FLAGS.extra:
        if "=" not in e:
            console.fail(f"--extra={e}: expected key=value")
    if FLAGS.report_only:
        seeds_done = []  # every seed that has a finished run, not just --seeds
        for dataset in FLAGS.datasets:
            for row_id in row_ids:
                d = os.path.join(out, dataset, row_id)
                if os.path.isdir(d):
                    seeds_done += [int(n[4:]) for n in os.listdir(d) if n.startswith("seed") and n[4:].isdigit()]
        seeds = sorted(set(seeds_done)) or seeds
    # Seeds outermost: a sweep stopped half-way has whole seeds of every row, not all seeds of half.
    for seed in seeds:
        for dataset in FLAGS.datasets:
            for row_id in row_ids:
                workdir = os.path.join(out, dataset, row_id, f"seed{seed}")
                if FLAGS.report_only:
                    continue
                overrides = run_overrides(dataset, row_id, seed, steps, FLAGS.quick)
                check_workdir_matches(workdir, dataset, overrides, FLAGS.extra)
                if os.path.exists(os.path.join(workdir, "results.json")):
                    continue
                print(f"{time.strftime('%H:%M:%S')} {dataset} {row_id} seed {seed} ...", flush=True)
                seconds = run_one(workdir, dataset, overrides, FLAGS.extra, FLAGS.data_dir)
                print(f"{time.strftime('%H:%M:%S')}   done in {seconds:.0f} s", flush=True)
                write_outputs(out, FLAGS.datasets, row_ids, seeds, steps)
    sweep = write_outputs(out, FLAGS.datasets, row_ids, seeds, steps)
    print(markdown_table(sweep, FLAGS.datasets, row_ids, steps))
    print(f"wrote {os.path.join(out, 'sweep.json')}, table.md and loss_comparison.png")


if __name__ == "__main__":
    from siamese_jax import cli

    define_flags()
    cli.run_app(main)  # --help exits 0; a bad flag or input is one error line, exit 2
