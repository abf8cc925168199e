"""SwiftFormer-L3 on ImageNet-1k, the official recipe (paper: 83.0% top-1, 28.5M params, 4.0 GMACs).

  python main.py --config=configs/l3.py --workdir=DIR --config.data_dir=TFDS_DIR

The full default.py recipe: RandAugment, random erasing, mixup 0.8 / cutmix 1.0. Distillation as in
s.py: from DeiT's RegNetY-160, imported into `checkpoints/regnety_160` (or
--config.distillation.kind=none). On many devices, --config.dtype=bfloat16 halves activation memory.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.variant = "L3"
    return config
