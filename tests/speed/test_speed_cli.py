"""The speed options of ``hfbridge finetune`` reach the run's config."""

from hfbridge import cli
from hfbridge.recipe import pipeline


def _config(monkeypatch, argv):
    seen = []
    monkeypatch.setattr(pipeline, "run", seen.append)
    assert cli.main(["finetune", *argv]) == 0
    return seen[0]


def test_speed_options_default_to_packing_auto_and_chunked_loss(monkeypatch):
    cfg = _config(monkeypatch, [])
    assert (cfg.speed.packing, cfg.speed.pack_length, cfg.speed.chunked_loss) == ("auto", None, True)
    assert not (cfg.speed.activation_checkpointing or cfg.speed.compile or cfg.speed.liger)


def test_speed_options_are_passed_through(monkeypatch):
    cfg = _config(monkeypatch, ["--packing", "off", "--pack-length", "1024", "--no-chunked-loss",
                                "--activation-checkpointing", "--compile", "--liger"])
    assert (cfg.speed.packing, cfg.speed.pack_length, cfg.speed.chunked_loss) == ("off", 1024, False)
    assert cfg.speed.activation_checkpointing and cfg.speed.compile and cfg.speed.liger
