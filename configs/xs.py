"""SwiftFormer-XS on ImageNet-1k, the official recipe (paper: 75.7% top-1, 3.5M params, 0.6 GMACs).

  python main.py --config=configs/xs.py --workdir=DIR --config.data_dir=TFDS_DIR

Differs from default.py: no RandAugment (the official script passes --aa="", so timm falls back to
ColorJitter 0.4) and no mixup/cutmix. Distillation as in s.py: from DeiT's RegNetY-160, imported
into `checkpoints/regnety_160` (or --config.distillation.kind=none).
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.variant = "XS"
    config.augment.rand_augment = False
    config.augment.color_jitter = 0.4
    config.mixup.mixup_alpha = 0.0
    config.mixup.cutmix_alpha = 0.0
    return config
