"""The benchmark feeds every system the same targets: what Trainer and TRL get (the model shifts) must be
hfbridge's already-shifted labels."""

from bench_loader import load_bench


def _bench():
    return load_bench("speed")


def test_baselines_get_the_same_targets_as_hfbridge(tiny_tokenizer):
    bench = _bench()
    samples = bench.build_samples(tiny_tokenizer, 12, max_length=1024)
    assert len({len(s.input_ids) for s in samples}) > 3  # a spread of lengths
    for sample in samples:
        ids, labels = bench.unshifted(sample, tiny_tokenizer.pad_token_id)
        # the Hugging Face loss: logits[:, :-1] against labels[:, 1:], the inputs being ids[:-1]
        assert ids[:-1] == sample.input_ids and labels[1:] == sample.labels


def test_every_default_system_is_known_and_the_median_run_is_reported():
    bench = _bench()
    assert {"hfbridge", "trainer", "trl", "trl-packing"} <= set(bench.SYSTEMS)
    assert all(name in bench.SYSTEMS for name in bench.DEFAULT_SYSTEMS.split(","))
    assert bench.median_run([{"tokens": 1, "seconds": s} for s in (3, 1, 2)])["seconds"] == 2
