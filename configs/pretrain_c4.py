"""Pretrain T5.1.1 (or a UL2-20B-shaped model) on C4 with span corruption, as T5 and T5X do.

    python -m t5lite.train --config configs/pretrain_c4.py:base --workdir gs://BUCKET/t5_base \
        --config.mesh.fsdp=16 --config.train.batch_size=256
    python -m t5lite.aot --config configs/pretrain_c4.py:xxl --topology v5p:4x4x4 ...

The argument picks the size: small, base, large, xl, xxl (T5.1.1's released shapes) or ul2_20b
(UL2-20B, Tay et al. 2022: 32 + 32 layers, d_model 4096, 16 heads x 256, d_ff 16384, gated-SiLU
MLP: the `ul2_20b` preset of t5lite/models/presets.py). Inputs 512
tokens, targets 114 (span corruption's 15% noise at mean span 3), the task's own T5 vocabulary
(32000 SentencePiece pieces + 100 sentinels, embedding padded to 32128). C4 comes from TFDS
(`c4/en:3.1.0`, prepared beforehand; docs/data.md). Adafactor with T5's rsqrt schedule
(lr 0.01, 10k warm-up steps), bf16 compute, layers scanned and fully rematerialised: the memory
settings of docs/scaling.md, where `python -m t5lite.aot` shows what fits which TPU slice.
"""
from t5lite.config import base_config
from t5lite.models.presets import model_config


def get_config(arg=None):
  size = arg or 'base'
  c = base_config()
  c.model = model_config(size, variant='v1_1', vocab_size=32128)
  c.model.dtype = 'bfloat16'
  c.model.scan_layers = True
  c.model.remat_policy = 'full'
  c.data.task = 'c4_span_corruption'
  c.data.vocabulary = 'task'
  c.data.inputs_length = 512  # targets 0: T5's span-corruption length for it, 114
  c.train.batch_size = 256
  c.train.steps = 524_288  # 2^19, T5's pretraining steps
  c.schedule.name = 'rsqrt'
  c.schedule.warmup_steps = 10_000
  c.optimizer.name = 'adafactor'
  c.optimizer.learning_rate = 0.01
  c.eval.every_steps = 0
  c.checkpoint.every_steps = 2000
  return c
