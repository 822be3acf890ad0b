"""The shipped config distilled from an ensemble of five of its variants (run D in BUILD_NOTES).

The student is `omniglot_pretrained` unchanged (encoder, 48 px, shifts, 30,000 steps, one view), plus
Park et al.'s (2019) relational distillation: every P x K batch also matches the student's pairwise
distances to those of five finished teacher runs, their embeddings concatenated
(`siamese_jax/distillation.py`, `losses.relational_distance_loss`). The student keeps the shipped
model's size and embedding speed; the teachers only cost training time.

    # the five teachers (skip any whose workdir already has results.json), then the student:
    siamese-train --config=omniglot_distilled:teacher=omni-pre-s1 --workdir=runs/omni-pre-s1
    ...  (omni-pre-s2, omni-w-s0, omni-x-s0, omni-56-s0)
    siamese-train --config=omniglot_distilled --workdir=runs/omni-d-s0
    # or, in a checkout, all six in order: make pretrained   (~6 h on the 2-core CPU box)

`--config=omniglot_distilled:teachers_dir=DIR` reads the teachers from DIR instead of `runs`.
Each teacher is `omniglot_pretrained` with the overrides in TEACHERS (BUILD_NOTES: the 3-seed runs of
the shipped config, runs W, X and 56); together they score 0.7462 on 4,000 validation episodes where
the best of them alone scores 0.7218. The distillation weight, 10, puts the term on the order of the
triplet loss (a weight of 1 made it 1/20 of the loss); chosen before any validation number.
"""
from siamese_jax.configs import omniglot_pretrained

# Teacher workdir name -> overrides of omniglot_pretrained, exactly as each teacher was trained.
TEACHERS = {
    "omni-pre-s1": dict(seed=1),
    "omni-pre-s2": dict(seed=2),
    "omni-w-s0": dict(widths=(32, 64, 128, 128), num_steps=20000),  # run W: ~3.3x the multiply-adds
    "omni-x-s0": dict(classes_per_batch=128, num_steps=7500,  # run X: P x K 128 x 4, same images seen
                      eval_every_steps=500, checkpoint_every_steps=500),
    "omni-56-s0": dict(image_size=56, num_steps=24000),  # run 56: drawn at 56 px
}
DISTILL_WEIGHT = 10.0


def teacher_config(name: str):
    """The config teacher `name` (a key of TEACHERS) was trained with."""
    if name not in TEACHERS:
        raise ValueError(f"unknown teacher {name!r}; teachers: {', '.join(TEACHERS)}")
    c = omniglot_pretrained.get_config()
    for key, value in TEACHERS[name].items():
        c[key] = value
    return c


def get_config(arg: str = ""):
    """`""` or `teachers_dir=DIR`: the student; `teacher=NAME`: one of the teachers."""
    key, _, value = (arg or "").partition("=")
    if key == "teacher":
        return teacher_config(value)
    if key not in ("", "teachers_dir"):
        raise ValueError(f"omniglot_distilled: unknown argument {arg!r} (teacher=NAME or teachers_dir=DIR)")
    teachers_dir = value or "runs"
    c = omniglot_pretrained.get_config()
    c.distill_teachers = ",".join(f"{teachers_dir.rstrip('/')}/{name}" for name in TEACHERS)
    c.distill_weight = DISTILL_WEIGHT
    return c
