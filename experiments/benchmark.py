"""Speed and memory benchmarks, each row against a peer measured in the same run (ratios, not claims).

    python -m experiments.benchmark [--quick] [--out=runs/benchmark-cpu.json] [--cpu_devices=N]

Rows (ours / peer; > 1 means ours is faster, or for memory smaller):
1. The train steps against the same network, loss, batch and optimizer (Adam) in PyTorch, the best
   of eager and `torch.compile` (on CUDA both with bf16 autocast and channels_last; ours in bf16):
   the CPU default (16-32-64-128 + BatchNorm at 35 px, P×K 32×4, every positive pair with the
   anchor's hardest negative), Koch et al.'s 105x105 net with its verification loss and with the
   triplet loss, and 4 x conv-128 + BatchNorm at 56 px with batch-hard (the GPU headline configs;
   on CPU at small batches). PyTorch is the optional `bench` extra; without it the rows say so.
   The CPU default also as training runs it: with its on-device augmentation (a random ±2 px shift
   and Simard's elastic field, bilinear) inside the step, the peer doing the same with `grid_sample`.
2. The fused BatchNorm + ReLU + max-pool op against the same three Flax layers (a lever, kept).
   The memory of three of the train steps (the CPU default, Koch's verification step, 4 x conv-128)
   against the peer's (the less of eager and `torch.compile`), each in a process of its own
   (experiments/step_memory.py): on CPU the resident memory the measured steps need above the
   framework's own, on GPU the peak device memory. Their ratio is peer / ours: > 1 means ours needs less.
3. The training loop of `experiments.train` (on-device sampling, metrics, validation, checkpoints)
   against its bare train step on a fixed batch: the loop's marginal steps/s from two runs that
   differ only in their number of steps, so data loading, compiles and evaluation cancel out.
4. Embedding PNG files (decode + resize + encoder) with `inference.SiameseModel.embed`, against
   the same work in PyTorch (PIL decode, antialiased resize, the same encoder in eval mode).
5. P×K sampling + augmentation on device against the P×K sampling in NumPy on the host followed by
   the same jitted augmentation (after the host-to-device copy); the host resize of every start-up
   and embedded file (`augment.resize_uint8`) against PIL's; exact k-NN (jitted top-k) against NumPy.

Timing: warm-up calls excluded (compiles, torch.compile's codegen), then the median of `repeats`
timed blocks, each ended by a device synchronisation. The JSON file holds every row and the machine.
"""
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import flags  # noqa: E402

FLAGS = flags.FLAGS
# Every row, in the order a full run prints them (`--only` takes these ids).
ROW_IDS = ["step_cpu_default", "step_koch_verification", "step_koch_triplet", "step_conv128_batch_hard",
           "step_cpu_default_augmented", "fused_bn", "memory_step_cpu_default", "memory_step_koch_verification",
           "memory_step_conv128_batch_hard", "loop", "embed_png", "resize_host", "sampling", "knn"]
# The train-step rows whose memory is measured too (`memory_<id>`): the CPU default, Koch et al.'s
# network and the activation-heavy 4 x conv-128 (Koch's triplet row is the same network).
MEMORY_ROWS = ("step_cpu_default", "step_koch_verification", "step_conv128_batch_hard")


def define_flags():
    """The command-line flags, defined when run as a script, not on import: experiments.benchmark
    and experiments.loss_sweep both have --quick, and a test process imports both."""
    flags.DEFINE_bool("quick", False, "Small sizes and few repeats (a smoke run, e.g. in CI).")
    flags.DEFINE_string("data_dir", None, "Data root (default: $SIAMESE_DATA_DIR).")
    flags.DEFINE_string("out", None, "JSON file to write (default: runs/benchmark-<platform>.json).")
    flags.DEFINE_integer("cpu_devices", None, "XLA CPU devices (default: one per core, as experiments.train).")
    flags.DEFINE_list("only", None, f"Run only these rows (ids: {', '.join(ROW_IDS)}).")

ROWS = []
# Rows that read the Omniglot archives (images_background.zip; the embedding row the PNGs of
# images_evaluation.zip), checked before anything is timed.
DATA_ROWS = ("loop", "embed_png", "resize_host", "sampling", "knn")


def _median_rate(fn, calls_per_block, blocks, sync, warmup=3):
    """Median over `blocks` of calls/s, each block `calls_per_block` calls ended by `sync(out)`."""
    for _ in range(warmup):
        sync(fn())
    rates = []
    for _ in range(blocks):
        t = time.perf_counter()
        for _ in range(calls_per_block):
            out = fn()
        sync(out)
        rates.append(calls_per_block / (time.perf_counter() - t))
    return statistics.median(rates)


def _row(row_id, name, unit, ours, peer, ours_name, peer_name, lower_is_better=False, **extra):
    """Prints and records a row. Its ratio is how many times better ours is: ours / peer for a rate,
    peer / ours for a cost (`lower_is_better`, e.g. memory); > 1 means ours is ahead either way."""
    ratio = ((peer / ours if lower_is_better else ours / peer) if (ours and peer) else None)
    peer_text = f"{peer:10.1f} {unit}" if peer else f"{'n/a':>10} ({extra.get('peer_note', 'not measured')})"
    print(f"{name:<38} {ours_name}: {ours:10.1f} {unit}   {peer_name}: {peer_text}   "
          f"ratio {'%6.2fx' % ratio if ratio else '   n/a'}", flush=True)
    ROWS.append(dict(id=row_id, name=name, unit=unit, ours=ours, peer=peer, ratio=ratio,
                     ratio_of="peer/ours" if lower_is_better else "ours/peer",
                     ours_name=ours_name, peer_name=peer_name, **extra))


def _torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        return None
    from experiments import torch_peer

    return torch_peer


# ------------------------------------------------------------------------------------------------
# Train steps, ours against PyTorch
# ------------------------------------------------------------------------------------------------
def _step_specs(quick, on_gpu):
    """(id, title, ours' config, peer kind, batch description) of the four train-step rows."""
    pk_default = (32, 4)
    if on_gpu:
        koch_pairs, koch_triplets, pk128 = 128, 128, (128, 4)
    elif quick:
        koch_pairs, koch_triplets, pk128 = 4, 4, (8, 4)
    else:
        koch_pairs, koch_triplets, pk128 = 32, 16, (32, 4)
    return [
        ("step_cpu_default", "train step: CPU default (35px, P×K 32×4)",
         dict(model="small", widths=(16, 32, 64, 128), image_size=35, loss="triplet", triplet_selection="online_all",
              classes_per_batch=pk_default[0], images_per_class=pk_default[1]), "small_hardest"),
        ("step_koch_verification", f"train step: Koch-105 verification ({koch_pairs} pairs)",
         dict(model="koch", embedding_dim=4096, image_size=105, loss="verification", batch_size=koch_pairs), "koch_verification"),
        ("step_koch_triplet", f"train step: Koch-105 triplet ({koch_triplets} triplets)",
         dict(model="koch", embedding_dim=4096, image_size=105, loss="triplet", triplet_selection="random",
              batch_size=koch_triplets),
         "koch_triplet"),
        ("step_conv128_batch_hard", f"train step: 4×conv-128@56 batch-hard (P×K {pk128[0]}×{pk128[1]})",
         dict(model="small", widths=(128, 128, 128, 128), image_size=56, loss="batch_hard",
              classes_per_batch=pk128[0], images_per_class=pk128[1]), "small_batch_hard"),
    ]


def _host_batch(spec):
    """The row's fixed global batch as NumPy arrays (random binary images; NumPy only, so that a
    peer's memory process imports no JAX): P×K images and labels, pairs, or triplets."""
    import numpy as np

    from siamese_jax import train_step as ts
    from siamese_jax.configs import default

    config = default.get_config("omniglot")
    config.update(spec)
    rng = np.random.default_rng(0)
    size = config.image_size
    kind = ts.batch_kind(config.loss, config.triplet_selection)
    image = lambda n: (rng.random((n, size, size, 1)) > 0.8).astype(np.float32)  # noqa: E731
    if kind == "classes":
        p, k = config.classes_per_batch, config.images_per_class
        return {"images": image(p * k), "labels": np.repeat(np.arange(p), k).astype(np.int32)}
    b = config.batch_size
    if kind == "pairs":
        return {"x1": image(b), "x2": image(b), "is_similar": (np.arange(b) % 2).astype(np.int32)}
    return {n: image(b) for n in ("anchor", "positive", "negative")}


def _our_step(spec, dtype, fused=True, augment=False):
    """Ours: (step_fn, fixed global batch as numpy) for a spec, the jitted data-parallel step of
    experiments.train on the mesh over all devices. `augment`: with the config's on-device
    augmentation inside the step, as training runs it (off for the peer rows: the peer has none)."""
    import jax
    import optax

    from siamese_jax.configs import default
    from siamese_jax import models, parallel
    from siamese_jax import train_step as ts

    config = default.get_config("omniglot")
    config.update(spec)
    config.compute_dtype = dtype
    model = models.build_model(config)
    if not fused and config.model == "small":
        model = model.clone(encoder=model.encoder.clone(fused_batch_norm=False))
    tx = optax.adam(1e-3)
    mesh = parallel.make_data_mesh()
    host = _host_batch(spec)
    parallel.check_batch_divisible(len(next(iter(host.values()))), mesh)
    batch = jax.device_put(host, parallel.batch_sharded(mesh))
    # Initialised under jit, as experiments.train does: Flax's init run op by op compiled ~150 small
    # programs, 4.7 s and +147 MB of resident memory for the CPU default (2.4 s, +38 MB jitted).
    init = jax.jit(lambda key: ts.create_train_state(model, tx, key, config.image_size))
    state = parallel.put_replicated(init(jax.random.PRNGKey(0)), mesh)
    margin = 0.5 if config.loss != "verification" else 0.0
    augment_fn = None
    if augment and config.augment:
        from siamese_jax import augment as augment_lib
        from siamese_jax import input_pipeline

        aff = input_pipeline.augment_config(config)
        augment_fn = lambda k, x: augment_lib.random_affine(k, x, aff)  # noqa: E731
    step = ts.make_train_step(model, tx, mesh, loss=config.loss, margin=margin,
                              triplet_selection=config.triplet_selection, augment_fn=augment_fn)
    key = jax.random.PRNGKey(0)
    holder = {"s": state}

    def one():
        holder["s"], metrics = step(holder["s"], batch, key)
        return metrics["loss"]

    one.compiled_hlo = lambda: step.lower(holder["s"], batch, key).compile().as_text()  # for profile_step
    return one, host


def _interleaved_rates(contestants, calls, blocks, warmup=3):
    """{name: calls/s} for contestants {name: (fn, sync)}: each warmed up, then `blocks` rounds that
    time one block of `calls` calls of every contestant in turn, round r starting with contestant r
    (mod their number); the median block per contestant.
    Interleaved so that ours and the peers share the same minutes: this box's speed drifts by up to
    30% from one minute to the next, and timing ours, then the peer, moved ratios by as much."""
    for fn, sync in contestants.values():
        for _ in range(warmup):
            sync(fn())
    rates = {name: [] for name in contestants}
    order = list(contestants)
    for block in range(blocks):
        # Each round starts with the next contestant, so none always runs first after the others
        # (a cache or the scheduler could favour a position; the peer review of 2026-12-06).
        for name in order[block % len(order):] + order[:block % len(order)]:
            fn, sync = contestants[name]
            t = time.perf_counter()
            for _ in range(calls):
                out = fn()
            sync(out)
            rates[name].append(calls / (time.perf_counter() - t))
    return {name: statistics.median(r) for name, r in rates.items()}


def _peer_steps(torch_peer, kind, host, image_size, device, quick=False, widths=(16, 32, 64, 128), augment=None,
                modes=None):
    """{"eager": (fn, sync), "torch.compile": (fn, sync)} (eager only with `quick`: torch.compile's
    codegen takes minutes on CPU): the peer's train step on the row's batch. `augment`: see
    torch_peer.make_step. `modes`: only these of the two (each builds its own model and optimizer)."""
    import numpy as np
    import torch

    if "images" in host:
        x = host["images"]
        target = torch.from_numpy(host["labels"]).long()
    elif "x1" in host:
        x = np.stack([host["x1"], host["x2"]], 1).reshape((-1,) + host["x1"].shape[1:])
        target = torch.from_numpy(host["is_similar"])
    else:
        x = np.stack([host["anchor"], host["positive"], host["negative"]], 1).reshape((-1,) + host["anchor"].shape[1:])
        target = torch.zeros(len(host["anchor"]))
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)
    if device.startswith("cuda"):
        images = images.to(memory_format=torch.channels_last)
    target = target.to(device)
    sync = lambda _: torch_peer.synchronize(device)  # noqa: E731
    steps = {}
    if modes is None:
        modes = ("eager",) if quick else ("eager", "torch.compile")
    for compiled in (mode == "torch.compile" for mode in modes):
        step = torch_peer.make_step(kind, compile=compiled, device=device, image_size=image_size, widths=widths,
                                    augment=augment)
        steps["torch.compile" if compiled else "eager"] = ((lambda step=step: step(images, target)), sync)
    return steps


def _best_peer(rates):
    """(rate, mode) of the fastest peer among interleaved rates {"ours...": r, "eager": r, ...}."""
    peers = {name: r for name, r in rates.items() if not name.startswith("ours")}
    mode = max(peers, key=peers.get)
    return peers[mode], mode


def _step_setting():
    """(torch_peer or None, on_gpu, our dtype, torch device) for the train-step rows; on CPU the peer
    gets one torch thread per core, as ours gets one XLA device per core."""
    import jax

    torch_peer = _torch()
    on_gpu = jax.devices()[0].platform == "gpu"
    if torch_peer is not None and not on_gpu:
        import torch

        from siamese_jax import parallel

        torch.set_num_threads(parallel.available_cores())
    return torch_peer, on_gpu, "bfloat16" if on_gpu else "float32", "cuda" if on_gpu else "cpu"


def bench_steps(quick, only):
    import jax

    torch_peer, on_gpu, dtype, device = _step_setting()
    calls, blocks = (2, 3) if quick else (10, 7)
    for row_id, title, spec, peer_kind in _step_specs(quick, on_gpu):
        if only and row_id not in only:
            continue
        if spec["model"] == "koch" and not on_gpu:
            # ~1 s per Koch step on 2 CPU cores (~3 s at --quick's 4 pairs in CI, where its 9 steps
            # were half a minute per row of the test suite's benchmark smoke run).
            c, b = (1, 2) if quick else (2, 5)
        else:
            c, b = calls, blocks
        one, host = _our_step(spec, dtype)
        contestants = {"ours": (one, jax.block_until_ready)}
        peer, mode, note = None, None, "torch not installed (pip install -e '.[bench]')"
        if torch_peer is not None:
            # The peer gets the row's encoder widths: without them the 4 x conv-128 row once timed the
            # default 16-32-64-128 network against ours (a 0.06x "ratio" that compared two networks).
            contestants.update(_peer_steps(torch_peer, peer_kind, host, spec["image_size"], device, quick,
                                           widths=spec.get("widths", (16, 32, 64, 128))))
            note = None
        rates = _interleaved_rates(contestants, c, b, warmup=1 if quick else 4)
        if torch_peer is not None:
            peer, mode = _best_peer(rates)
        _row(row_id, title, "step/s", rates["ours"], peer, f"ours {dtype}", f"torch {mode or ''}".strip(),
             peer_mode=mode, peer_note=note, peer_rates={k: v for k, v in rates.items() if k != "ours"},
             images_per_step=sum(len(v) for k, v in host.items() if v.ndim == 4))


def _peer_augmentation(spec):
    """The default config's augmentation as torch_peer.make_step's `augment` dict (shift + elastic
    field in pixels of the image drawn); an error if the config asks for more than the peer does."""
    from siamese_jax import input_pipeline
    from siamese_jax.configs import default

    config = default.get_config("omniglot")
    config.update(spec)
    aff = input_pipeline.augment_config(config)
    if aff is None or (aff.rotation_deg, aff.shear, tuple(aff.scale), aff.prob) != (0.0, 0.0, (1.0, 1.0), 1.0):
        raise ValueError(f"the peer augments with shifts and the elastic field only, not {aff}")
    limit = aff.translate_px * (config.image_size / aff.translate_reference_size if aff.translate_reference_size else 1.0)
    return dict(translate_limit=limit, alpha=aff.elastic_alpha, sigma=aff.elastic_sigma)


def bench_augmented_step(quick):
    """The CPU default's step with the on-device augmentation inside, as experiments.train runs it,
    against the peer augmenting the same way inside its step; ours on the fixed batch is timed in
    the same run, so the row also says what the augmentation costs us."""
    import jax

    torch_peer, on_gpu, dtype, device = _step_setting()
    calls, blocks = (2, 3) if quick else (10, 7)
    spec = _step_specs(quick, on_gpu)[0][2]
    augment = _peer_augmentation(spec)
    contestants = {}
    for with_augment in (True, False):
        one, host = _our_step(spec, dtype, augment=with_augment)
        contestants["ours" if with_augment else "ours, fixed batch"] = (one, jax.block_until_ready)
    peer, mode, note = None, None, "torch not installed (pip install -e '.[bench]')"
    if torch_peer is not None:
        contestants.update(_peer_steps(torch_peer, "small_hardest", host, spec["image_size"], device, quick,
                                       widths=spec["widths"], augment=augment))
        note = None
    rates = _interleaved_rates(contestants, calls, blocks, warmup=1 if quick else 4)
    if torch_peer is not None:
        peer, mode = _best_peer(rates)
    fixed = rates["ours, fixed batch"]
    print(f"  (ours on the fixed batch, same rounds: {fixed:.1f} step/s; the augmentation costs "
          f"{100 * (1 - rates['ours'] / fixed):.0f}% of our step)", flush=True)
    _row("step_cpu_default_augmented", "train step: CPU default + augmentation", "step/s", rates["ours"], peer,
         f"ours {dtype}", f"torch {mode or ''}".strip(), peer_mode=mode, peer_note=note,
         peer_rates={k: v for k, v in rates.items() if not k.startswith("ours")}, ours_fixed_batch=fixed,
         peer_augment=augment)


def bench_fused_bn(quick):
    import jax

    spec = _step_specs(quick, False)[0][2]
    contestants = {}
    for fused in (True, False):
        one, _ = _our_step(spec, "float32", fused=fused)
        contestants[fused] = (one, jax.block_until_ready)
    rates = _interleaved_rates(contestants, 2 if quick else 10, 3 if quick else 7)
    _row("fused_bn", "BatchNorm+ReLU+pool in the CPU default", "step/s", rates[True], rates[False],
         "fused op", "Flax layers")


# ------------------------------------------------------------------------------------------------
# The train steps' memory, ours against PyTorch
# ------------------------------------------------------------------------------------------------
def can_measure_resident_memory() -> bool:
    """Whether a process here can read and reset its resident high-water mark (Linux's /proc), as
    experiments.step_memory does on a CPU."""
    return os.access("/proc/self/clear_refs", os.W_OK) and os.path.exists("/proc/self/status")


def _step_memory(row_id, contestant, quick, on_gpu, cpu_devices=None):
    """experiments.step_memory's JSON for one contestant, measured in a process of its own."""
    import json
    import subprocess

    cmd = [sys.executable, "-m", "experiments.step_memory", f"--row={row_id}", f"--contestant={contestant}"]
    cmd += ["--quick", "--warmup=1", "--steps=2"] if quick else ["--warmup=2", "--steps=5"]
    if on_gpu:
        cmd.append("--gpu")
    elif cpu_devices:
        cmd.append(f"--cpu_devices={cpu_devices}")
    env = dict(os.environ)
    if on_gpu:  # this process holds half the card (split_gpu_memory_with_peer); the child allocates as it goes
        env.pop("XLA_CLIENT_MEM_FRACTION", None)
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{row_id}: the {contestant} memory process failed (exit {r.returncode}): {last}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_memory(quick, only, cpu_devices=None):
    """The memory each train step needs beyond its framework (CPU: resident memory during the
    measured steps; GPU: the peak device memory), ours against the peer's least of eager and
    torch.compile (eager only with `quick`); each contestant in a fresh process, see
    experiments/step_memory.py. The ratio is peer / ours: > 1 means ours needs less."""
    import jax

    torch_peer = _torch()
    on_gpu = jax.devices()[0].platform == "gpu"
    if not on_gpu and not can_measure_resident_memory():
        print("memory rows: not measured (resident memory is read from Linux's /proc)", flush=True)
        return
    if torch_peer is not None and on_gpu:
        import torch

        torch.cuda.empty_cache()  # the speed rows' cached blocks, out of the children's way
    titles = {row_id: title for row_id, title, _, _ in _step_specs(quick, on_gpu)}
    dtype = "bfloat16" if on_gpu else "float32"
    for row_id in MEMORY_ROWS:
        if only and f"memory_{row_id}" not in only:
            continue
        ours = _step_memory(row_id, "ours", quick, on_gpu, cpu_devices)
        peers, note = {}, "torch not installed (pip install -e '.[bench]')"
        if torch_peer is not None:
            note = None
            for mode in ("eager",) if quick else ("eager", "torch.compile"):
                peers[mode] = _step_memory(row_id, mode, quick, on_gpu)
        mode = min(peers, key=lambda m: peers[m]["step_mb"]) if peers else None
        _row(f"memory_{row_id}", "memory: " + titles[row_id].replace("train step: ", ""), "MB",
             ours["step_mb"], peers[mode]["step_mb"] if mode else None, f"ours {dtype}",
             f"torch {mode or ''}".strip(), lower_is_better=True, peer_mode=mode, peer_note=note,
             measured="peak device memory over the process" if on_gpu else
             "resident memory during the measured steps above the framework's own",
             ours_setup_peak_mb=ours["setup_peak_mb"], peer_mb={m: p["step_mb"] for m, p in peers.items()},
             peer_setup_peak_mb={m: p["setup_peak_mb"] for m, p in peers.items()})


# ------------------------------------------------------------------------------------------------
# The training loop against its bare step
# ------------------------------------------------------------------------------------------------
def bench_loop(quick, data_dir):
    """Marginal steps/s of experiments.train's loop (validation and checkpoints on, at make train's
    interval: every 500 steps) against the bare step on a fixed batch."""
    import jax

    from siamese_jax.configs import default
    from siamese_jax import train as train_lib

    # make train validates and saves every 500 steps: the two runs of a pair differ by 1,000 steps and
    # 2 of each.
    interval = 20 if quick else 500
    short, long_ = interval, 3 * interval
    # Three pairs of runs (one with --quick), the median taken: one pair's difference moved the ratio
    # from 0.79 to 1.11 on one machine within four hours (2026-12-07), a minute's drift of the box
    # landing on one of its two runs. The bare step is timed before the first pair, between the pairs
    # and after the last (10 blocks of 10 steps each time), so each pair has its own bare rate from
    # the same minutes: this box's speed drifts by up to 30% from one minute to the next, and a bare
    # step timed once, minutes away from the runs, gave ratios from 0.68 to 1.29. Blocks of 10 steps:
    # with 100 steps in flight after a training, XLA:CPU once aborted in an all-gather rendezvous
    # ("only 1 of 2 threads arrived" in 40 s); the training loop keeps at most 2 steps in flight.
    # The bare step does the same work per step as the loop's: make train's, with its augmentation.
    pairs = 1 if quick else 3
    one, _ = _our_step(_step_specs(quick, False)[0][2], "float32", augment=True)

    def time_bare():
        return [_median_rate(one, 2 if quick else 10, 1, jax.block_until_ready, warmup=1)
                for _ in range(3 if quick else 10)]

    def train_seconds(steps):
        config = default.get_config("omniglot")
        config.archive_dir = data_dir
        config.num_steps = steps
        config.eval_every_steps = config.checkpoint_every_steps = interval
        config.plots = False
        config.eval_episodes = 20
        with tempfile.TemporaryDirectory() as workdir:
            results = train_lib.train(config, workdir)  # no final evaluation: only its time counts
        return float(results["train_seconds"])

    # An untimed run first: the timed runs then find the same warm compilation caches (otherwise the
    # first pays the compiles and the difference of the two can even come out negative).
    train_seconds(short)
    bare_phases = [time_bare()]
    loop_rates, pair_ratios = [], []
    for p in range(pairs):
        # Short first, then long first: a steady drift of the box favours neither.
        order = (short, long_) if p % 2 == 0 else (long_, short)
        seconds = {steps: train_seconds(steps) for steps in order}
        bare_phases.append(time_bare())
        if seconds[long_] <= seconds[short]:
            raise RuntimeError(f"loop row: the {long_}-step run ({seconds[long_]:.2f} s) was not slower than the "
                               f"{short}-step run ({seconds[short]:.2f} s); the box is too noisy to measure")
        loop_rates.append((long_ - short) / (seconds[long_] - seconds[short]))
        pair_ratios.append(loop_rates[-1] / statistics.median(bare_phases[-2] + bare_phases[-1]))
    bare_blocks = [rate for phase in bare_phases for rate in phase]
    loop, bare = statistics.median(loop_rates), statistics.median(bare_blocks)
    _row("loop", "training loop (val+ckpt on) vs bare step", "step/s", loop, bare, "loop", "bare step",
         note=f"marginal rate between {short}- and {long_}-step runs, median of {pairs} pair(s) after an untimed "
              f"warm-up run; bare: median of {len(bare_blocks)} blocks timed before, between and after the pairs",
         pair_rates=loop_rates, pair_ratios=pair_ratios, bare_min=min(bare_blocks), bare_max=max(bare_blocks))
    if pairs > 1:
        print(f"  (each pair against the bare blocks around it: {', '.join(f'{r:.2f}x' for r in pair_ratios)})",
              flush=True)


# ------------------------------------------------------------------------------------------------
# Embedding PNG files
# ------------------------------------------------------------------------------------------------
def _png_folder(root, data_dir, count):
    """Writes the first `count` evaluation PNGs into `root`; returns their paths."""
    import zipfile

    archive = os.path.join(data_dir or os.environ.get("SIAMESE_DATA_DIR", ""), "omniglot", "images_evaluation.zip")
    with zipfile.ZipFile(archive) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".png"))[:count]
        for i, n in enumerate(names):
            with open(os.path.join(root, f"{i:05d}.png"), "wb") as f:
                f.write(z.read(n))
    return [os.path.join(root, f"{i:05d}.png") for i in range(len(names))]


def bench_embed(quick, data_dir):
    import numpy as np

    from siamese_jax import images as img_lib
    from siamese_jax.inference import load_model

    count = 256 if quick else 2460
    with tempfile.TemporaryDirectory(prefix="bench_png_") as root:  # removed with its PNGs
        paths = _png_folder(root, data_dir, count)
        model = load_model("pretrained")
        model.embed(paths[:512])  # warm-up: the padded batch shapes compile once
        ours = _median_rate(lambda: model.embed(paths), 1, 3 if quick else 5, lambda e: np.asarray(e)) * len(paths)

        peer, note = None, "torch not installed (pip install -e '.[bench]')"
        torch_peer = _torch()
        if torch_peer is not None:
            import torch
            import torch.nn.functional as F

            from siamese_jax import parallel

            torch.set_num_threads(parallel.available_cores())  # as the step rows: one thread per core
            from PIL import Image

            widths = tuple(model.config.widths)
            encoder = torch_peer.small_encoder(widths, int(model.config.embedding_dim), model.image_size).eval()
            size = model.image_size

            def embed_torch():
                gray = []
                for p in paths:  # the same decode: grayscale, ink bright (Omniglot is black on white)
                    with Image.open(p) as im:
                        gray.append(255 - np.asarray(im.convert("L"), np.uint8))
                x = torch.from_numpy(np.stack(gray).astype(np.float32))[:, None]
                x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
                x = torch.clamp(torch.round(x), 0, 255) / 255.0
                with torch.inference_mode():
                    return torch.cat([encoder(x[i:i + 512]) for i in range(0, len(x), 512)])

            peer = _median_rate(embed_torch, 1, 3 if quick else 5, lambda e: None) * len(paths)
            note = None
        _row("embed_png", f"embed {len(paths)} PNG files (105 px -> {model.image_size} px)", "img/s", ours, peer,
             "ours", "torch", peer_note=note)
    del img_lib


# ------------------------------------------------------------------------------------------------
# Sampling and k-NN (JAX against NumPy)
# ------------------------------------------------------------------------------------------------
def bench_sampling(ds, n):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from siamese_jax import augment, sampling

    P, K, size = 32, 4, 35
    dds = sampling.to_device_dataset(ds, image_size=size)
    cfg = augment.AffineConfig()
    on_device = jax.jit(lambda key, step: sampling.sample_pk_batch(key, step, dds, P, K, augment_cfg=cfg)["images"])
    key = jax.random.PRNGKey(0)
    counter = iter(range(10 ** 9))
    ours = _median_rate(lambda: on_device(key, next(counter)), n, 5, jax.block_until_ready)

    images = np.asarray(dds.images)
    labels = np.asarray(ds.labels)
    by_class = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    classes = np.array(sorted(by_class))
    rng = np.random.default_rng(0)
    aug = jax.jit(lambda k, x: augment.random_affine(k, x, cfg))

    def host():
        picked = rng.choice(classes, P, replace=False)
        idx = np.concatenate([rng.choice(by_class[c], K, replace=False) for c in picked])
        return aug(key, jnp.asarray(images[idx].astype(np.float32)[..., None] / 255.0))

    peer = _median_rate(host, n, 5, jax.block_until_ready)
    _row("sampling", "P×K sampling + augmentation", "batch/s", ours, peer, "on device", "host NumPy",
         note="the peer samples the indices with NumPy on the host, copies the batch to the device and "
              "runs the same jitted augmentation: sampling on device against sampling on the host")


def bench_resize(ds, quick):
    """The host resize every Omniglot start-up and every embedded file goes through, against PIL."""
    import numpy as np
    from PIL import Image

    from siamese_jax import augment

    images = np.asarray(ds.images)[:1024] if quick else np.concatenate(
        [np.rot90(ds.images, k, axes=(1, 2)) for k in range(4)])  # the training start-up's rotated classes
    size = 48  # the shipped model's input
    ours = _median_rate(lambda: augment.resize_uint8(images, size), 1, 3 if quick else 5, lambda x: x, warmup=1)

    def pil_resize():  # the same antialiased triangle filter, one image at a time
        return np.stack([np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR)) for a in images])

    peer = _median_rate(pil_resize, 1, 3 if quick else 5, lambda x: x, warmup=1)
    diff = np.abs(augment.resize_uint8(images, size).astype(int) - pil_resize().astype(int))
    _row("resize_host", f"resize {len(images)} images 105 -> {size} px", "img/s", ours * len(images),
         peer * len(images), "ours", "PIL", max_abs_diff_vs_peer=int(diff.max()),
         mean_abs_diff_vs_peer=float(diff.mean()))


def bench_knn(n):
    import numpy as np

    from siamese_jax import evaluation

    rng = np.random.default_rng(0)
    index = rng.normal(size=(20000, 64)).astype(np.float32)
    query = rng.normal(size=(1000, 64)).astype(np.float32)
    ours = _median_rate(lambda: evaluation.knn(query, index, 10)[1], n, 3, lambda x: x)

    def numpy_knn():
        d = (query ** 2).sum(1)[:, None] - 2 * query @ index.T + (index ** 2).sum(1)[None]
        part = np.argpartition(d, 10, axis=1)[:, :10]
        order = np.take_along_axis(d, part, 1).argsort(1)
        return np.take_along_axis(part, order, 1)

    peer = _median_rate(numpy_knn, n, 3, lambda x: x)
    np.testing.assert_array_equal(evaluation.knn(query, index, 10)[1], numpy_knn())  # same answer
    _row("knn", "k-NN 1k queries x 20k (k=10)", "call/s", ours, peer, "jitted top-k", "NumPy")


def _machine():
    import jax

    from siamese_jax import parallel

    info = {"platform": jax.devices()[0].platform, "devices": jax.device_count(),
            "device_kind": jax.devices()[0].device_kind, "cpu": platform.processor() or platform.machine(),
            "cores": parallel.available_cores(), "python": sys.version.split()[0], "jax": jax.__version__}
    if info["platform"] == "gpu":  # how the device's memory was shared with the peer
        info["jax_gpu_memory"] = {name: os.environ[name] for name in _GPU_MEMORY_SETTINGS if os.environ.get(name)}
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = None
    return info


# What a user may have chosen for JAX's GPU memory (jaxlib's names; the two fractions together are an error).
_GPU_MEMORY_SETTINGS = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE",
                        "XLA_PYTHON_CLIENT_ALLOCATOR")
GPU_MEMORY_FRACTION = "0.5"


def split_gpu_memory_with_peer(environ) -> None:
    """On a GPU the PyTorch peer runs in this process beside us. JAX preallocates 75% of the GPU's
    memory at its first operation, which would leave the peer's rows a quarter (~20 GB of an H100)
    and fail them with an out-of-memory error first; each gets half instead. A setting the user made
    is kept. Read when JAX creates its GPU client (the first `jax.devices()`); no effect on a CPU."""
    if not any(environ.get(name) for name in _GPU_MEMORY_SETTINGS):
        environ["XLA_CLIENT_MEM_FRACTION"] = GPU_MEMORY_FRACTION


def main(argv):
    del argv
    from siamese_jax import cli
    from siamese_jax import parallel
    from siamese_jax.files import atomic_write_json, check_output_file

    cli.setup_logging()

    # The same CPU device split as experiments.train (P×K 32×4 = 128 images per step).
    parallel.use_cpu_cores_as_devices(128, FLAGS.cpu_devices)
    split_gpu_memory_with_peer(os.environ)
    import jax

    # Every compile happens here, whatever JAX_COMPILATION_CACHE_DIR says (the test suite sets one):
    # the loop row's runs of different lengths compile different programs, and a cache that served
    # only the short one would bias its marginal rate.
    jax.config.update("jax_enable_compilation_cache", False)

    from siamese_jax.data import load
    from siamese_jax.data.errors import DataError

    only = set(FLAGS.only or [])
    unknown = sorted(only - set(ROW_IDS))
    if unknown:
        cli.fail(f"--only: unknown row {', '.join(unknown)} (rows: {', '.join(ROW_IDS)})")
    want = lambda row: not only or row in only  # noqa: E731
    data_rows = [row for row in DATA_ROWS if want(row)]
    if data_rows:  # a missing archive used to surface as a traceback after ~20 min of step rows
        from siamese_jax.data import archives, sources

        root = sources.resolve_archive_dir(FLAGS.data_dir)
        missing = [archives.OMNIGLOT_FILES[split] for split in ("background", "evaluation")
                   if not sources.has_archives(root, "omniglot", split)]
        if missing:
            where = "no data folder given" if root is None else f"{', '.join(missing)} not in {root}"
            cli.fail(f"the rows {', '.join(data_rows)} read the Omniglot archives: {where}; give --data_dir "
                     f"(or $SIAMESE_DATA_DIR) the folder holding omniglot/, or leave those rows out of --only")
    machine = _machine()
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} ({jax.devices()[0].platform}); "
          f"torch {machine['torch'] or 'not installed'}", flush=True)
    quick = FLAGS.quick
    out = FLAGS.out or os.path.join("runs", f"benchmark-{machine['platform']}.json")
    try:  # before minutes of measuring: a folder or an unwritable place fails now, in one line
        check_output_file(out)  # (its error names --out itself)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    except IsADirectoryError as e:
        cli.fail(str(e))
    except OSError as e:
        cli.fail(f"--out={out}: {e.strerror or e}")
    report = {"machine": machine, "quick": quick, "command": " ".join(sys.argv), "rows": ROWS}
    try:
        bench_steps(quick, only)
        if want("step_cpu_default_augmented"):
            bench_augmented_step(quick)
        if want("fused_bn"):
            bench_fused_bn(quick)
        if any(want(f"memory_{row_id}") for row_id in MEMORY_ROWS):
            bench_memory(quick, only, FLAGS.cpu_devices)
        if want("loop"):
            bench_loop(quick, FLAGS.data_dir)
        if want("embed_png"):
            bench_embed(quick, FLAGS.data_dir)
        if want("sampling") or want("knn") or want("resize_host"):
            ds = load("omniglot", "background", archive_dir=FLAGS.data_dir)
            if want("resize_host"):
                bench_resize(ds, quick)
            if want("sampling"):
                bench_sampling(ds, 20 if quick else 100)
            if want("knn"):
                bench_knn(3 if quick else 10)
        atomic_write_json(out, report)  # (inside: a failed write keeps the rows as .incomplete.json)
    except BaseException as e:
        # Keep the rows already measured (minutes of them), beside `out`: a complete earlier report
        # there is not replaced by a partial one.
        kept = ""
        if ROWS:
            partial = os.path.splitext(out)[0] + ".incomplete.json"
            atomic_write_json(partial, {**report, "incomplete": f"{type(e).__name__}: {e}"})
            kept = f" (the {len(ROWS)} row{'s' * (len(ROWS) > 1)} measured before it: {partial})"
        if isinstance(e, DataError):  # bad data is the user's to fix: one line, not a traceback
            cli.fail(f"{e}{kept}")
        if kept:
            print(kept.strip(" ()"), file=sys.stderr)
        raise
    print(f"wrote {out}")


if __name__ == "__main__":
    from siamese_jax import cli

    define_flags()
    cli.run_app(main)  # --help exits 0; a bad flag is one error line, exit 2
