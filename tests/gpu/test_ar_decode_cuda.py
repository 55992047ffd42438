"""KV-cached AR decoding through a CUDA graph: the replayed step gives the tokens of the same step
run eagerly (greedy and seeded sampling), and the graph survives a second generate. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from cupola.collections.world.autoregressive import ARWorldModel, ar_config, generate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_graph_decoding_gives_the_static_steps_tokens():
    torch.manual_seed(0)
    model = ARWorldModel(ar_config("tiny"))
    model.init_weights()
    model = model.cuda().eval()
    grid = (3, 4, 4)
    prefix = torch.randint(0, 125, (2, 16), device="cuda")
    for kwargs in ({"temperature": 0}, {"temperature": 1.0, "top_k": 20, "seed": 3}):
        static = generate(model, prefix, grid, 32, decode="static", **kwargs)
        assert torch.equal(generate(model, prefix, grid, 32, decode="graph", **kwargs), static)
        assert torch.equal(generate(model, prefix, grid, 32, **kwargs), static)  # auto: graph on CUDA
    eager = generate(model, prefix, grid, 32, temperature=0, decode="eager")
    assert (eager == generate(model, prefix, grid, 32, temperature=0)).float().mean() > 0.9
