"""SwiftFormer-L1 on ImageNet-1k, the official recipe (paper: 80.9% top-1, 12.1M params, 1.6 GMACs).

  python main.py --config=configs/l1.py --workdir=DIR --config.data_dir=TFDS_DIR

The full default.py recipe: RandAugment, random erasing, mixup 0.8 / cutmix 1.0. Distillation as in
s.py: from DeiT's RegNetY-160, imported into `checkpoints/regnety_160` (or
--config.distillation.kind=none).
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.variant = "L1"
    return config
