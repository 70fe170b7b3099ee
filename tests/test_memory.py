"""Host memory: streaming never holds a copy of the model in anonymous memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from lazystream.synthetic import build_qwen3

# ~170M parameters, 12 blocks of ~50 MB: about 680 MB in float32.
SIZE = {"hidden_size": 1024, "num_hidden_layers": 12, "num_attention_heads": 16, "num_key_value_heads": 8,
        "head_dim": 64, "intermediate_size": 3072, "vocab_size": 8000}

MEASURE = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import Qwen3ForCausalLM  # library code is not model memory: import it first
    from lazystream import LazyStreamModel, streamer_of
    from lazystream.telemetry import PeakRssAnon

    ids = torch.randint(0, 8000, (1, 8))
    torch.ones(1) @ torch.ones(1)  # let torch set up its allocator and thread pool first
    with PeakRssAnon() as rss:
        model = LazyStreamModel.from_pretrained(sys.argv[1], int(sys.argv[2]), prefetch=2)
        with torch.no_grad():
            for _ in range(2):
                model(ids)
    s = streamer_of(model)
    print(json.dumps({"growth": rss.growth, "resident": s.plan.resident_bytes,
                      "slots": s.plan.slots * s.plan.slot_bytes, "model": s.ckpt.nbytes}))
""")


@pytest.fixture(scope="module")
def checkpoint_680mb(tmp_path_factory):
    return build_qwen3(tmp_path_factory.mktemp("qwen3-680mb"), SIZE, max_shard_size="100MB")


def test_peak_anonymous_rss_growth_is_resident_plus_slots(checkpoint_680mb):
    run = subprocess.run([sys.executable, "-c", MEASURE, str(checkpoint_680mb), "2"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    m = json.loads(run.stdout.strip().splitlines()[-1])
    assert m["model"] > 500 * 2**20
    budget = m["resident"] + m["slots"] + 64 * 2**20
    assert m["growth"] <= budget, f"anonymous RSS grew {m['growth'] / 2**20:.0f} MiB, budget {budget / 2**20:.0f} MiB"
    assert budget < 0.7 * m["model"]  # the bound is tight enough to catch a full host copy
