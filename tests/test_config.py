import pytest

from trainer.config import ConfigError, load_config, parse_override

ROOT_CONFIGS = ["configs/tsn.yaml", "configs/tsn_dist_and_dali.yaml", "configs/tsn_demo.yaml"]
ROOT = __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__)))


@pytest.fixture
def cfg_file(tmp_path):
    def write(text):
        p = tmp_path / "c.yaml"
        p.write_text(text)
        return str(p)

    return write


@pytest.mark.parametrize("path", ROOT_CONFIGS)
def test_shipped_configs_load(path):
    import os

    cfg = load_config(os.path.join(os.path.dirname(os.path.dirname(__file__)), path))
    assert cfg.MODEL.name == "TSN"
    assert cfg.OPTIMIZER.momentum == 0.9


def test_production_configs_keep_the_kinetics_recipe():
    import os

    root = os.path.dirname(os.path.dirname(__file__))
    for path in ROOT_CONFIGS[:2]:
        cfg = load_config(os.path.join(root, path))
        assert cfg.MODEL.backbone.depth == 50 and cfg.PIPELINE.target_size == 224
        assert cfg.MODEL.head.num_classes == 400 and cfg.PIPELINE.num_segments == 3
        assert cfg.OPTIMIZER.weight_decay == 1e-4 and cfg.OPTIMIZER.base_lr == 0.01
    assert load_config(os.path.join(root, ROOT_CONFIGS[1])).DATASET.source == "videos"


def test_unknown_key_is_an_error_naming_key_and_suggestion(cfg_file):
    with pytest.raises(ConfigError) as e:
        load_config(cfg_file("OPTIMIZER:\n  momentm: 0.8\n"))
    msg = str(e.value)
    assert "OPTIMIZER.momentm" in msg and "did you mean 'momentum'" in msg and "\n" not in msg


def test_wrong_type_is_an_error_naming_value_and_expectation(cfg_file):
    with pytest.raises(ConfigError, match=r"DATASET.batch_size = 'big'.*expected an integer"):
        load_config(cfg_file("DATASET:\n  batch_size: big\n"))
    with pytest.raises(ConfigError, match=r"MODEL.backbone.depth = 42.*one of 18, 34, 50, 101"):
        load_config(cfg_file("MODEL:\n  backbone:\n    depth: 42\n"))
    with pytest.raises(ConfigError, match="must be >= 1"):
        load_config(cfg_file("epochs: 0\n"))
    with pytest.raises(ConfigError, match="true or false"):
        load_config(cfg_file("amp: 1\n"))


def test_defaults_fill_missing_keys_and_ints_are_accepted_as_floats(cfg_file):
    cfg = load_config(cfg_file("OPTIMIZER:\n  base_lr: 1\n"))
    assert cfg.OPTIMIZER.base_lr == 1.0 and isinstance(cfg.OPTIMIZER.base_lr, float)
    assert cfg.DATASET.batch_size == 32


def test_overrides_are_parsed_as_yaml_and_validated(cfg_file):
    path = cfg_file("epochs: 5\n")
    cfg = load_config(
        path,
        [
            "OPTIMIZER.base_lr=0.02",
            "PIPELINE.flip=false",
            "epochs=7",
            "OPTIMIZER.decay_points=[0.5, 0.75]",
            "output_dir=out dir",
        ],
    )
    assert cfg.OPTIMIZER.base_lr == 0.02 and cfg.PIPELINE.flip is False and cfg.epochs == 7
    assert cfg.OPTIMIZER.decay_points == [0.5, 0.75] and cfg.output_dir == "out dir"
    with pytest.raises(ConfigError, match="unknown key 'OPTIMIZER.lr'.*-o OPTIMIZER.lr=1"):
        load_config(path, ["OPTIMIZER.lr=1"])
    with pytest.raises(ConfigError, match="SECTION.key=value"):
        load_config(path, ["epochs"])
    with pytest.raises(ConfigError, match="is a section"):
        load_config(path, ["MODEL=3"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(path, ["epochs=ten"])


def test_parse_override_splits_on_first_equals():
    assert parse_override("output_dir=a=b") == (["output_dir"], "a=b")
    assert parse_override("MODEL.head.num_classes=101") == (["MODEL", "head", "num_classes"], 101)


def test_base_config_is_merged_and_missing_files_are_named(cfg_file, tmp_path):
    (tmp_path / "base.yaml").write_text("epochs: 9\nDATASET:\n  batch_size: 4\n")
    cfg = load_config(cfg_file("_base_: base.yaml\nDATASET:\n  num_threads: 1\n"))
    assert cfg.epochs == 9 and cfg.DATASET.batch_size == 4 and cfg.DATASET.num_threads == 1
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(cfg_file("epochs: [1,\n"))


def test_the_pp_and_tsm_configs_keep_their_recipes():
    import os

    def cfg(name):
        return load_config(os.path.join(ROOT, "configs", name))

    tsm, pptsn, pptsm, dense = cfg("tsm.yaml"), cfg("pptsn.yaml"), cfg("pptsm.yaml"), cfg("pptsm_dense.yaml")
    assert (tsm.MODEL.name, tsm.PIPELINE.num_segments, tsm.MODEL.backbone.shift_div) == ("TSM", 8, 8)
    assert tsm.OPTIMIZER.schedule == "step" and tsm.MODEL.head.label_smoothing == 0
    for c in (pptsn, pptsm, dense):
        assert c.MODEL.backbone.depth == 50 and c.PIPELINE.num_segments == 8
        assert c.MODEL.head.label_smoothing == 0.1 and c.PIPELINE.mixup_alpha == 0.2
        assert c.OPTIMIZER.schedule == "cosine" and c.OPTIMIZER.warmup_epochs > 0
        assert c.OPTIMIZER.warmup_start_lr == 0.005 and c.OPTIMIZER.lr_mult == {"head.fc.weight": 5, "head.fc.bias": 10}
    assert (pptsn.PIPELINE.test_num_segments, pptsn.PIPELINE.test_num_crops) == (25, 10)
    assert pptsm.MODEL.name == "PP-TSM" and pptsm.PRECISE_BN.enabled
    assert (dense.PIPELINE.sampling, dense.PIPELINE.dense_interval, dense.PIPELINE.test_num_clips) == ("dense", 8, 10)


def test_a_model_name_typo_lists_the_models(cfg_file):
    with pytest.raises(ConfigError, match="MODEL.name = 'PPTSM'.*one of TSN, TSM, PP-TSN, PP-TSM"):
        load_config(cfg_file("MODEL:\n  name: PPTSM\n"))


def test_tsm_cannot_test_on_another_segment_count_or_one_segment(cfg_file):
    with pytest.raises(
        ConfigError, match="PIPELINE.test_num_segments = 25 .*TSM is built for PIPELINE.num_segments = 8"
    ):
        load_config(cfg_file("MODEL: {name: TSM}\nPIPELINE: {num_segments: 8, test_num_segments: 25}\n"))
    with pytest.raises(ConfigError, match="needs at least 2"):
        load_config(cfg_file("MODEL: {name: PP-TSM}\n"), ["PIPELINE.num_segments=1"])
    tsn = load_config(cfg_file("MODEL: {name: TSN}\nPIPELINE: {num_segments: 8, test_num_segments: 25}\n"))
    assert (tsn.PIPELINE.num_segments, tsn.PIPELINE.test_num_segments) == (8, 25)  # TSN may: no shift


def test_a_schedule_or_sampling_typo_is_a_config_error(cfg_file):
    with pytest.raises(ConfigError, match="OPTIMIZER.schedule = 'cosin'.*one of step, cosine"):
        load_config(cfg_file("OPTIMIZER: {schedule: cosin}\n"))
    with pytest.raises(ConfigError, match="PIPELINE.sampling = 'uniform'.*one of segment, dense"):
        load_config(cfg_file(""), ["PIPELINE.sampling=uniform"])


def test_feed_workers_default_to_auto_and_take_zero_or_more(cfg_file, monkeypatch):
    from common.processes import default_num_workers

    path = cfg_file("epochs: 5\n")
    assert load_config(path).DATASET.num_workers is None  # auto: a share of the host's cores
    assert load_config(path, ["DATASET.num_workers=0"]).DATASET.num_workers == 0
    with pytest.raises(ConfigError, match=r"DATASET.num_workers = -1.*must be >= 0"):
        load_config(path, ["DATASET.num_workers=-1"])
    with pytest.raises(ConfigError, match=r"DATASET.num_workers = 'many'.*an integer or null"):
        load_config(path, ["DATASET.num_workers=many"])
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    for local_ranks, workers in ((1, 15), (2, 7), (8, 1), (16, 1)):
        monkeypatch.setenv("PADDLE_LOCAL_SIZE", str(local_ranks))
        assert default_num_workers() == workers


def test_keep_checkpoints_defaults_to_all_and_a_typo_or_a_negative_count_is_named(cfg_file):
    path = cfg_file("epochs: 5\n")
    assert load_config(path).keep_checkpoints == 0  # every epoch_N.pdckpt stays
    assert load_config(path, ["keep_checkpoints=2"]).keep_checkpoints == 2
    with pytest.raises(ConfigError, match=r"keep_checkpoints = -1.*must be >= 0"):
        load_config(path, ["keep_checkpoints=-1"])
    with pytest.raises(ConfigError, match=r"unknown key 'keep_checkpoint'.*did you mean 'keep_checkpoints'"):
        load_config(cfg_file("keep_checkpoint: 3\n"))


@pytest.mark.parametrize(
    "override,message",
    [
        ("OPTIMIZER.base_lr=.nan", "must be a finite number"),
        ("OPTIMIZER.weight_decay=.inf", "must be a finite number"),
        ("MODEL.head.dropout=1", "must be < 1.0"),
        ("MODEL.head.label_smoothing=1.5", "must be < 1.0"),
        ("OPTIMIZER.momentum=1.0", "must be < 1.0"),
        ("OPTIMIZER.decay_factor=2", "must be < 1.0"),
        ("OPTIMIZER.decay_points=[0.8,0.4]", "must be increasing fractions"),
        ("OPTIMIZER.decay_points=[0.5,1.0]", "must be increasing fractions"),
        ("OPTIMIZER.grad_clip=0", "must be > 0 .null disables"),
        ("PIPELINE.target_size=300", "target_size must be <= short_size"),
    ],
)
def test_values_outside_their_meaningful_range_are_one_line_errors(cfg_file, override, message):
    path = cfg_file("MODEL:\n  head:\n    num_classes: 5\n")
    with pytest.raises(ConfigError, match=r"config error: .*" + message):
        load_config(path, [override])
    assert load_config(path, ["OPTIMIZER.grad_clip=null", "OPTIMIZER.decay_points=[]"]).OPTIMIZER.grad_clip is None


def test_a_config_from_an_editor_reads_and_another_encoding_is_named(cfg_file, tmp_path):
    p = tmp_path / "win.yaml"
    p.write_bytes("\ufeffMODEL:\r\n  head:\r\n    num_classes: 7\r\n".encode())
    assert load_config(str(p)).MODEL.head.num_classes == 7
    p.write_bytes("# caf\u00e9\nepochs: 3\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"win.yaml:1: not UTF-8 text"):
        load_config(str(p))


def test_lr_multipliers_and_warmup_start_lr_are_validated(cfg_file):
    cfg = load_config(
        cfg_file("OPTIMIZER:\n  lr_mult: {head.fc.weight: 5, head.fc.bias: 10}\n  warmup_start_lr: 0.005\n"),
        ["OPTIMIZER.stage_lr_mult=[0.1, 0.2, 0.4, 0.8, 1]"],
    )
    assert cfg.OPTIMIZER.lr_mult == {"head.fc.weight": 5, "head.fc.bias": 10}
    assert cfg.OPTIMIZER.stage_lr_mult == [0.1, 0.2, 0.4, 0.8, 1] and cfg.OPTIMIZER.warmup_start_lr == 0.005
    assert load_config(cfg_file("")).OPTIMIZER.warmup_start_lr is None
    bad = {
        "OPTIMIZER:\n  lr_mult: {head.fc.weight: fast}\n": r"OPTIMIZER.lr_mult = .*expected a mapping of name: number",
        "OPTIMIZER:\n  lr_mult: [5, 10]\n": r"OPTIMIZER.lr_mult = \[5, 10\].*expected a mapping",
        "OPTIMIZER:\n  lr_mult: {head.fc.bias: -1}\n": r"OPTIMIZER.lr_mult.head.fc.bias = -1 .*>= 0",
        "OPTIMIZER:\n  stage_lr_mult: [1, x]\n": r"OPTIMIZER.stage_lr_mult = \[1, 'x'\].*a list or null of numbers",
        "OPTIMIZER:\n  stage_lr_mult: [1, .nan]\n": r"OPTIMIZER.stage_lr_mult\[1\] = nan",
        "OPTIMIZER:\n  warmup_start_lr: 0.5\n": r"OPTIMIZER.warmup_start_lr = 0.5 .*must be <= base_lr",
        "OPTIMIZER:\n  warmup_start_lr: -0.1\n": r"OPTIMIZER.warmup_start_lr = -0.1 .*must be >= 0",
    }
    for text, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_config(cfg_file(text))
