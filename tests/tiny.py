"""The tiny training config the multi-process tests share: the demo recipe, a width-8 ResNet-18 at 32x32."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(path, demo_dataset, output_dir, epochs=2, batch_size=3, train_list=None) -> str:
    path.write_text(f"""_base_: {ROOT}/configs/tsn_demo.yaml
epochs: {epochs}
log_interval: 1
val_interval: 1
output_dir: {output_dir}
MODEL:
  backbone: {{depth: 18, base_channels: 8}}
DATASET:
  train_list: {train_list or demo_dataset / "train_pkl.list"}
  val_list: {demo_dataset / "val_pkl.list"}
  test_list: {demo_dataset / "val_pkl.list"}
  label_file: {demo_dataset / "label.txt"}
  batch_size: {batch_size}
PIPELINE: {{target_size: 32, short_size: 40}}
PRECISE_BN: {{num_iters: 3}}
""")
    return str(path)


def weight_digests(text: str) -> dict[str, str]:
    """{rank: digest} of the 'rank R: weights digest D' lines the ranks print at the end of training."""
    from trainer.engine import read_digests

    return read_digests(text)


def tiny_cfg(tmp_path, *overrides, num_classes=5, name="tiny.yaml"):
    """The config of a width-8 ResNet-18 TSN with ``num_classes`` classes, for tests without data."""
    from trainer.config import load_config

    p = tmp_path / name
    p.write_text(f"MODEL:\n  backbone: {{depth: 18, base_channels: 8}}\n  head: {{num_classes: {num_classes}}}\n")
    return load_config(str(p), list(overrides))


def tiny_model(tmp_path, num_classes=5, seed=0, name="tiny.yaml"):
    """(config, model) of ``tiny_cfg``, the model's weights drawn from ``seed``."""
    import paddle

    from trainer.models import build_model

    cfg = tiny_cfg(tmp_path, num_classes=num_classes, name=name)
    paddle.seed(seed)
    return cfg, build_model(cfg)
