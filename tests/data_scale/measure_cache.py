"""Time tokenization of a generated 20,000-record chat file with the embedded SmolLM2 tokenizer: the first run
(cache miss: tokenized, in parallel over the CPUs, and written) against the second (cache hit: read back).
Tokenization only, no training. Run: HF_HUB_OFFLINE=1 .venv/bin/python tests/data_scale/measure_cache.py"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from transformers import AutoTokenizer

from hfbridge.data.datamodule import load_records
from hfbridge.data.token_cache import cached_tokenize
from hfbridge.models.loading import resolve_model_path

N = 20_000


def main() -> None:
    tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m-instruct"))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "chat.jsonl"
        months = ["January", "February", "March", "April", "May", "June"]
        with data.open("w") as f:
            for i in range(N):
                messages = [{"role": "user", "content": f"Convert {months[i % 6]} {i % 28 + 1}, {1900 + i % 200} "
                                                        f"to ISO 8601, please (request {i})."},
                            {"role": "assistant", "content": f"{1900 + i % 200}-{i % 6 + 1:02d}-{i % 28 + 1:02d}"}]
                f.write(json.dumps({"messages": messages}) + "\n")
        t0 = time.time()
        records, fmt = load_records(data)
        read = time.time() - t0
        times = []
        for _ in range(2):
            t0 = time.time()
            samples, status = cached_tokenize(tok, records, fmt, 512, root=Path(tmp) / "cache")
            times.append((status, time.time() - t0))
        size = sum(p.stat().st_size for p in (Path(tmp) / "cache").rglob("*") if p.is_file())
    print(f"{N} records ({sum(len(s.input_ids) for s in samples)} tokens), CPUs {len(os.sched_getaffinity(0))}, "
          f"python {sys.version.split()[0]}")
    print(f"reading and checking the records: {read:.2f}s (both runs)")
    for status, seconds in times:
        print(f"tokenization, cache {status}: {seconds:.2f}s")
    print(f"cache entry on disk: {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
