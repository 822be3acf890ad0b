"""CPU-sized default configs, one per dataset: `--config=default:mnist` (or the path of this file).

`siamese-train --dataset=mnist` picks the `mnist` preset by itself; any `--config.key=value`
override is applied on top of the preset. `siamese_jax.config_check` says what values are allowed.
"""
import ml_collections

# Margins per loss, for the distance each loss uses (see siamese_jax/losses.py).
MARGINS = {
    "contrastive": 1.0,   # on d (Hadsell); embeddings unnormalised
    "triplet": 0.5,       # on d (squared=False below)
    "batch_hard": 0.5,
    "batch_all": 0.5,
    "semihard": 0.5,
    "verification": 0.0,  # unused (binary cross-entropy)
    "prototypical": 0.0,  # unused (softmax over the batch's class means)
    "arcface": 0.5,       # an angle, radians (Deng et al.'s 0.5)
    "multi_similarity": 0.1,  # the pair-mining margin epsilon on cosine similarities (Wang et al.'s 0.1)
}


def get_config(dataset: str = "omniglot") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.dataset = dataset
    c.loss = "triplet"
    c.seed = 0

    # Data: where the original archives are (None: $SIAMESE_DATA_DIR), which loader, TFDS data_dir.
    c.source = "auto"
    c.archive_dir = ml_collections.config_dict.placeholder(str)
    c.tfds_data_dir = ml_collections.config_dict.placeholder(str)
    c.cache_dir = ml_collections.config_dict.placeholder(str)

    # Model: the small CPU encoder, channels doubling per block (16 -> 128) at 35x35 input:
    # 35 -> 17 -> 8 -> 4 -> 2, so the embedding sees a 2x2x128 map. Cheaper per step than 4 x 32
    # channels at 28x28 (the narrow first block is where the pixels are) and +4.5 points on Lake's runs
    # (BUILD_NOTES, ablations M and N).
    c.model = "small"
    c.widths = (16, 32, 64, 128)  # channels of each conv block
    c.embedding_dim = 64
    c.norm = "batch"
    c.l2_normalize = False  # unit-length embeddings, whatever the encoder
    # Koch's net obeys l2_normalize (the key's absence marks a config.json or model file written
    # before 2026-12-07, when Koch's net ignored it: models.l2_normalizes reads those as they trained).
    c.l2_normalize_koch = True
    c.compute_dtype = "float32"  # bfloat16 on GPU/TPU; bf16 convolutions are slow on CPU
    # Test-time augmentation of a trained model's embeddings (test_time.SHIFT_SETS: "none", "cross5",
    # "square9"): the mean over the 3 x 3 square of 1-px shifted copies, in inference and the final
    # evaluation; checkpoint selection during training always uses one view. Chosen on validation:
    # +0.023 / +0.028 one-shot accuracy over one view on 4,000 fresh validation episodes for both
    # seeds of this default (BUILD_NOTES, "Test-time shift averaging on Omniglot").
    c.test_time_shifts = "square9"
    c.image_size = 35
    # CPU only: how many XLA CPU devices to split the machine into (None: one per core, at most 8 and
    # a divisor of the batch). XLA:CPU runs this model's kernels mostly on one thread, so one device
    # per core is what uses the whole CPU (1.6x on 2 cores; BUILD_NOTES, "Performance").
    c.cpu_devices = ml_collections.config_dict.placeholder(int)

    # Loss.
    c.margin = ml_collections.config_dict.placeholder(float)  # None: MARGINS[loss]
    c.squared = False
    c.margins = dict(MARGINS)
    # ArcFace (loss="arcface"; needs l2_normalize=True): the softmax's scale s over cosines, and how
    # many class centres it learns (None: train.py counts the training classes and records it here).
    c.arcface_scale = 30.0
    c.num_classes = ml_collections.config_dict.placeholder(int)
    # Multi-similarity (loss="multi_similarity"; needs l2_normalize=True): Wang et al.'s weights of the
    # positive and negative terms (alpha, beta) and the similarity threshold lambda; the margin is epsilon.
    c.ms_alpha = 2.0
    c.ms_beta = 50.0
    c.ms_lambda = 0.5

    # Triplet loss, which triplets: "online_all" = from each P x K batch, every positive pair (a, p)
    # with the anchor's hardest negative (losses.hardest_negative_triplet_loss); "online" = one random
    # positive per anchor with its hardest negative; "random" = independent triplets sampled from the
    # dataset (see train_step.batch_kind).
    c.triplet_selection = "online_all"

    # Batches: pair/triplet losses draw `batch_size` rows; mining losses P classes x K images.
    c.batch_size = 128
    c.classes_per_batch = 32
    c.images_per_class = 4
    c.same_alphabet_negatives = True  # Lake-style harder negatives for pairs/triplets (Omniglot)
    # P x K batches with all P classes from one alphabet (harder negatives). Measured: no gain on
    # Lake's runs (BUILD_NOTES, ablation L), so off.
    c.pk_within_alphabet = False

    # 90/180/270-degree rotations of the training characters as new classes (ProtoNets): 4x classes,
    # from the training alphabets only. Measured: +2.7 points on Lake's runs for batch-hard (BUILD_NOTES).
    c.rotation_classes = True

    # Augmentation, on device inside the train step (augment.AffineConfig; translate_px is in pixels
    # of a 105-px image, so 6.0 is +-2 px at 35 px): every training image shifted by up to +-2 px and
    # bent by Simard et al.'s (2003) elastic distortion, alpha px of smoothed random displacement with
    # sigma px of smoothing in pixels of the image drawn (here mean 0.6 px, max 2.8 px at 35 px).
    # Rotation, shear and scale off. Chosen on validation over no augmentation and shifts alone, on
    # two seeds (0.707 / 0.691 against 0.689 / 0.686; BUILD_NOTES, "Augmenting make train"); costs
    # ~8% per step. Koch et al.'s ranges (omniglot_koch.py): 10 degrees, shear 0.3, scale 0.8-1.2,
    # 2 px, each with probability 0.5.
    c.augment = True
    c.augment_rotation_deg = 0.0
    c.augment_shear = 0.0
    c.augment_scale_min = 1.0
    c.augment_scale_max = 1.0
    c.augment_translate_px = 6.0
    c.augment_prob = 1.0
    c.augment_elastic_alpha = 42.0  # 0: off
    c.augment_elastic_sigma = 7.5

    # Optimisation: Adam with linear warm-up and cosine decay.
    c.learning_rate = 3e-3
    c.warmup_steps = 100
    c.weight_decay = 0.0
    # An exponential moving average of the weights (train_step.params_moving_average), validated,
    # selected and shipped in place of the live weights; 0: off (BUILD_NOTES, "Run EMA").
    c.ema_decay = 0.0
    # 12,000 steps: what the faster step (one XLA device per core, fused BatchNorm; issue #9) buys
    # within make train's 10 minutes on 2 cores. Lake's 20 runs 96.5 / 97.25% for seeds 0 and 1
    # (without the augmentation 97.0 / 97.0%); BUILD_NOTES, "Omniglot, the CPU default".
    c.num_steps = 12000
    # The cosine's length, when it should outlast the training (None: num_steps). Training stops at
    # num_steps on a schedule that would decay over lr_schedule_steps: e.g. 30,000 steps of a
    # 300,000-step cosine keep the rate at 97.6-100% of its peak (BUILD_NOTES, "Run EMA-C2").
    c.lr_schedule_steps = ml_collections.config_dict.placeholder(int)

    # Validation (model selection) from the *background* set only: held-out alphabets.
    c.val_alphabets = 4           # Omniglot: this many background alphabets never trained on,
    # evenly spaced in sorted order (Bengali, Futurama, Japanese_(hiragana), N_Ko for 4); or name them:
    # "A,B,..." (then val_alphabets is not used). Before 2026-12-04 a bug held out 2 for 4
    # (Balinese, Grantha); the shipped model's configs name those two (BUILD_NOTES, "Splits").
    c.val_alphabet_names = ""
    c.val_fraction = 1 / 6        # MNIST: the tail of the train split (10,000 images)
    c.val_episodes = 200
    c.eval_every_steps = 500
    c.checkpoint_every_steps = 500
    c.keep_checkpoints = 2
    c.log_every_seconds = 5.0

    # Final evaluation.
    c.eval_episodes = 1000
    c.eval_seed = 1234
    c.plots = True

    # Resume order: the workdir's own checkpoint, else `resume` (a checkpoint dir), else init.
    c.resume = ml_collections.config_dict.placeholder(str)

    # Relational distillation (siamese_jax/distillation.py): the teachers, comma-separated: workdirs of
    # finished runs on the same training set, exported model files or shipped model names; their
    # concatenated embeddings are the teacher. P x K losses only.
    c.distill_teachers = ""
    c.distill_weight = 1.0

    if dataset == "mnist":
        c.loss = "contrastive"
        c.same_alphabet_negatives = False
        c.rotation_classes = False
        c.augment = False  # the preset's 98.77% was measured without; mnist_pairs.py sets its own
        c.augment_elastic_alpha = 0.0
        c.test_time_shifts = "none"  # likewise; mnist_pairs.py chose its own on validation
        c.image_size = 28  # MNIST's own size
        # P x K losses: all 10 classes x 12 images (120 images per step, the loss comparison's MNIST
        # batch); Omniglot's 32 classes do not exist here.
        c.classes_per_batch = 10
        c.images_per_class = 12
        c.num_steps = 5000  # 12.8 epochs of 128 pairs; 98.77% test pair accuracy (BUILD_NOTES)
        c.eval_every_steps = 500
    elif dataset != "omniglot":
        raise ValueError(f"unknown dataset {dataset!r}; expected 'omniglot' or 'mnist'")
    return c
