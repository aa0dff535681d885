import pytest

from winnow.pipeline.core.config import default_of, from_dict, load, parse_overrides
from winnow.pipeline.core.errors import UserError
from winnow.pipeline.stages.ingest import IngestConfig
from winnow.workflows.settings import RunConfig, demo_config_path


def test_demo_config_loads_strictly():
    cfg = load(RunConfig, demo_config_path())
    assert cfg.ingest.shard_size == 500 and cfg.synth.n_pool == 5000 and cfg.cluster.n_workers == 2
    assert cfg.synth.rates.mismatch == 0.3 and cfg.synth.rates.tiny_image == 0.03  # nested, partly overridden
    assert cfg.demo.train[0] == "no_filter" and cfg.demo.dfn.samples_seen == 6400 and cfg.demo.seeds == [0, 1, 2]


def test_unknown_key_names_the_allowed_keys():
    with pytest.raises(UserError, match=r"unknown key 'timeot'.*allowed keys: .*timeout"):
        from_dict(RunConfig, {"ingest": {"timeot": 3}})


def test_wrong_type_is_a_user_error():
    with pytest.raises(UserError, match=r"ingest.timeout: expected float"):
        from_dict(RunConfig, {"ingest": {"timeout": "fast"}})


def test_int_widens_to_float_and_literals_are_checked():
    assert from_dict(IngestConfig, {"timeout": 3}).timeout == 3.0
    with pytest.raises(UserError, match="resize_mode"):
        from_dict(IngestConfig, {"resize_mode": "stretch"})


def test_cross_field_rules_stall_exceeds_deadline_which_covers_timeout():
    with pytest.raises(UserError, match="stall_seconds"):
        IngestConfig(timeout=10, deadline=30, stall_seconds=20)
    with pytest.raises(UserError, match="deadline"):
        IngestConfig(timeout=10, deadline=5)
    with pytest.raises(UserError, match="allow_hosts"):
        IngestConfig(allow_hosts=["10.0.0.0/99"])
    with pytest.raises(UserError, match="encoding"):
        IngestConfig(encoding="klingon-8")


def test_overrides_parse_yaml_scalars_and_nest():
    assert parse_overrides(["ingest.timeout=2.5", "synth.seed=3", "cluster.scheduler=tcp://h:8786"]) == {
        "ingest": {"timeout": 2.5}, "synth": {"seed": 3}, "cluster": {"scheduler": "tcp://h:8786"}}
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_overrides(["ingest.timeout"])


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load(RunConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("ingest: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load(RunConfig, bad)


def test_a_nested_set_changes_only_the_key_it_names():
    """``--set demo.dist.steps=50`` keeps the demo's own DiST settings (32 px, 5 per class) for the other keys."""
    cfg = load(RunConfig, demo_config_path(), ["demo.dist.steps=50"])
    assert cfg.demo.dist.steps == 50
    assert (cfg.demo.dist.size, cfg.demo.dist.per_class, cfg.demo.dist.batch) == (32, 5, 64)
    assert load(RunConfig, None, ["demo.patchmix.size=48"]).demo.patchmix.per_class == 12
    assert load(RunConfig, None, []).dist.size == 128  # the command's own section keeps the class default


def test_every_flag_names_a_config_key_with_a_default():
    """The CLI's flags are short names for config keys; each key exists, so its default comes from the config."""
    from winnow.workflows.cli import COMMANDS

    for command in COMMANDS:
        for flag in command.flags:
            if flag.key:
                for kind in ("dist", "patchmix"):
                    default_of(RunConfig, flag.key.replace("{kind}", kind))
