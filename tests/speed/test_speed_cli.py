"""The speed options of ``hfbridge finetune`` reach the job's config."""

from hfbridge import cli, finetune


def _config(monkeypatch, argv):
    seen = []
    monkeypatch.setattr(finetune, "run_finetune", seen.append)
    assert cli.main(["finetune", *argv]) == 0
    return seen[0]


def test_speed_options_default_to_packing_auto_and_chunked_loss(monkeypatch):
    cfg = _config(monkeypatch, [])
    assert (cfg.packing, cfg.pack_length, cfg.chunked_loss) == ("auto", None, True)
    assert not (cfg.activation_checkpointing or cfg.compile or cfg.liger)


def test_speed_options_are_passed_through(monkeypatch):
    cfg = _config(monkeypatch, ["--packing", "off", "--pack-length", "1024", "--no-chunked-loss",
                                "--activation-checkpointing", "--compile", "--liger"])
    assert (cfg.packing, cfg.pack_length, cfg.chunked_loss) == ("off", 1024, False)
    assert cfg.activation_checkpointing and cfg.compile and cfg.liger
