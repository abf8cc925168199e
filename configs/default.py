"""Every knob of the trainer, set to the official SwiftFormer recipe (Amshaker/SwiftFormer main.py).

Not a run by itself: `xs.py`, `s.py`, `l1.py` and `l3.py` override what differs per variant, and
`quickstart.py` shrinks everything for a CPU run. Any key can be overridden on the command line:

  python main.py --config=configs/s.py --workdir=DIR --config.batch_size=1024 --config.mesh.fsdp=2

Durations come in pairs, `*_epochs` and `*_steps`: a `*_steps` value > 0 wins, otherwise epochs are
converted with the data set's steps per epoch (`optim.steps_from`; an epoch is the whole global
batches of one pass over the training split).

Batch norm (`bn_group_size`): the official run used DDP without SyncBN, so each GPU normalised
over its own 128 images. A jitted global batch would normalise over all 2048; `bn_group_size=128`
(ghost batch norm) reproduces the official statistics whatever the device count. 0 normalises over
the whole global batch (SyncBN-like). The global batch must split into whole groups.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # model init, dropout/drop path, mixup and the training data order

    # Data ------------------------------------------------------------------------------------
    config.dataset = "imagenet2012"  # 'imagenet2012' (TFDS), 'digits' (no download), 'folder:/root'
    config.data_dir = config_dict.placeholder(str)  # TFDS data dir; None: TFDS's default (~/tensorflow_datasets)
    config.image_size = 224  # training and eval resolution
    config.eval_crop_pct = 0.875  # eval: resize shorter side to image_size / crop_pct, center crop
    config.repeated_aug = 3  # repeated augmentation (RASampler): copies of each image per epoch
    config.shuffle_window = 4096  # examples shuffled together in the training order (memory bound)

    # Augmentation on the host (swiftformer_jax.augment.AugmentConfig; same field names).
    config.augment = ml_collections.ConfigDict()
    config.augment.crop_scale = (0.08, 1.0)  # RandomResizedCrop area range
    config.augment.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop aspect range
    config.augment.hflip_prob = 0.5  # horizontal flip probability
    config.augment.rand_augment = True  # RandAugment rand-m9-mstd0.5-inc1 (else color_jitter)
    config.augment.rand_augment_layers = 2  # RandAugment ops per image
    config.augment.rand_augment_magnitude = 9.0  # RandAugment magnitude (0..10)
    config.augment.rand_augment_magnitude_std = 0.5  # per-op magnitude noise
    config.augment.rand_augment_increasing = True  # 'inc1' severity variants
    config.augment.color_jitter = 0.0  # ColorJitter strength when rand_augment is off (XS: 0.4)
    config.augment.random_erase_prob = 0.25  # random erasing probability ('pixel' mode)

    # Mixup / CutMix on device (swiftformer_jax.mixup); both alphas 0 turns them off.
    config.mixup = ml_collections.ConfigDict()
    config.mixup.mixup_alpha = 0.8  # Beta(alpha, alpha) for mixup; 0 disables mixup
    config.mixup.cutmix_alpha = 1.0  # Beta(alpha, alpha) for cutmix; 0 disables cutmix
    config.mixup.switch_prob = 0.5  # probability of cutmix when both are on
    config.mixup.prob = 1.0  # probability of mixing a batch (group) at all
    config.mixup.mode = "batch"  # 'batch' | 'pair' | 'elem': how many draws per group
    config.mixup.group_size = 128  # images mixed together (official: per GPU); 0 = the global batch
    config.label_smoothing = 0.1  # label smoothing (folded into the mixup targets)

    # Model -----------------------------------------------------------------------------------
    config.model = ml_collections.ConfigDict()
    config.model.variant = "S"  # 'XS' | 'S' | 'L1' | 'L3'
    config.model.depths = ()  # escape hatch: 4 stage depths replacing the variant's (tests, studies)
    config.model.widths = ()  # escape hatch: 4 stage widths, set together with depths
    config.model.attention_version = 2  # 2: official code since 2023-07 (and timm); 1: first release
    config.model.drop_path_rate = 0.0  # stochastic depth at the last block (official: 0, not set)
    config.model.drop_rate = 0.0  # dropout in the MLPs (official: 0)
    config.model.impl = "auto"  # ops' form: 'cpu' (tuned on XLA:CPU) | 'xla' | 'auto' (cpu on CPUs, else xla)
    config.dtype = "float32"  # compute dtype, 'float32' | 'bfloat16'; params/optimizer stay float32
    config.bn_group_size = 128  # ghost batch norm group (official per-GPU batch); 0 = global batch
    # Gradient accumulation: the global batch in micro-batches of this size (one update; memory of
    # one micro-batch); 0 = none. bn_group_size must then divide it (official: 128 = bn_group_size).
    config.microbatch_size = 0
    # jax.profiler trace of steps [start, start + count) into WORKDIR/profile (process 0); count 0 = off.
    config.profile_steps = (0, 0)

    # Distillation (DeiT): loss = (1 - alpha) * base + alpha * distillation, via the dist head.
    config.distillation = ml_collections.ConfigDict()
    config.distillation.kind = "hard"  # 'none' (one head) | 'hard' | 'soft'
    config.distillation.alpha = 0.5  # weight of the distillation term
    config.distillation.tau = 1.0  # temperature of soft distillation
    # The official teacher, DeiT's RegNetY-160 (https://dl.fbaipublicfiles.com/deit/regnety_160-a5fe301d.pth)
    # imported with `python -m swiftformer_jax.convert import --checkpoint regnety_160-a5fe301d.pth
    # --output checkpoints/regnety_160`; any checkpoint of a classifier (a workdir, an imported dir,
    # a PyTorch file; SwiftFormer or RegNetY) is a teacher too. Relative paths are from the cwd.
    config.distillation.teacher = "checkpoints/regnety_160"
    config.distillation.teacher_ema = False  # use the teacher checkpoint's EMA weights
    config.distillation.teacher_dtype = ""  # teacher compute dtype: '' = config.dtype, 'float32', 'bfloat16'

    # Optimisation ----------------------------------------------------------------------------
    config.batch_size = 2048  # global batch, over all devices and processes
    config.num_epochs = 300.0  # training length in epochs
    config.total_steps = -1  # training length in steps; > 0 overrides num_epochs
    config.learning_rate = 2e-3  # peak lr (official, at batch 2048)
    config.scale_learning_rate = False  # scale lr by batch_size / 2048 (official: no scaling)
    config.warmup_lr = 1e-6  # lr at step 0 of the warm-up
    config.min_lr = 1e-5  # cosine floor
    config.warmup_epochs = 5.0  # linear warm-up length in epochs
    config.warmup_steps = -1  # warm-up in steps; > 0 overrides warmup_epochs
    config.lr_per_epoch = False  # True: lr constant within an epoch, as timm stepped it officially
    config.lr_lag_one_epoch = False  # with lr_per_epoch: the official one-epoch lag (see optim.py)
    config.weight_decay = 0.025  # AdamW decoupled decay (not on biases / BN / 1-D tensors)
    config.adam_b1 = 0.9  # AdamW beta1
    config.adam_b2 = 0.999  # AdamW beta2
    config.adam_eps = 1e-8  # AdamW epsilon
    config.clip_mode = "agc"  # 'agc' | 'norm' | 'value' | 'none'
    config.clip_grad = 0.01  # clipping threshold (AGC factor for 'agc')
    config.ema_decay = 0.99996  # model EMA per step (params and BN statistics); 0: EMA = raw model
    config.ema_warmup = False  # decay min(ema_decay, (1+t)/(10+t)) early on, for short runs (official: off)

    # Devices ---------------------------------------------------------------------------------
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # data-parallel axis size; -1 = the devices fsdp leaves
    config.mesh.fsdp = 1  # axis that shards large params/optimizer state (and the batch)
    config.mesh.fsdp_min_size_mb = 4.0  # state arrays smaller than this stay replicated

    # Loop, evaluation, checkpoints -----------------------------------------------------------
    config.log_every_steps = 100  # train metrics + progress line interval
    config.eval_every_epochs = 1.0  # evaluation interval in epochs
    config.eval_every_steps = -1  # evaluation interval in steps; > 0 overrides eval_every_epochs
    config.eval_batch_size = 1024  # global eval batch (the last batch is padded and masked)
    config.checkpoint_every_epochs = 1.0  # checkpoint interval in epochs
    config.checkpoint_every_steps = -1  # checkpoint interval in steps; > 0 overrides the epochs
    config.keep_checkpoints = 3  # most recent checkpoints kept
    config.best_metric = "eval/accuracy"  # also keep the best checkpoint by this; '' = don't
    config.async_checkpointing = True  # write checkpoints in the background
    config.init_from = ""  # fine-tune from: workdir/step dir of ours, imported dir, PyTorch file
    config.init_from_ema = False  # take init_from's EMA weights

    return config.lock()
