"""bench.py: the measurements behind the README's speed table run and measure what they say (no timings are
asserted: the CI machine is shared)."""
import json

import pytest
import torch

import bench
from dreamhead import DreamHead, MaskedLatents
from l2i import L2IConfig, encode_conditions


def test_projection_counts_the_paper_preset_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--only", "projection", "--threads", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["projection"]
    assert [r["gpu"] for r in rows] == ["A100 bf16", "H100 bf16"]
    # 50 UNet passes of the paper preset (joint attention over 4 condition slots at 32x32) dominate: TFLOPs/frame
    assert 1e3 < rows[0]["gflops_per_frame"] < 1e5
    assert rows[1]["projected_fps"] == pytest.approx(rows[0]["projected_fps"] * bench.H100_BF16 / bench.A100_BF16)
    training = {r["stage"]: r for r in json.loads(out.read_text())["projection_training"]}
    assert set(training) == {"VAE", "A2L", "L2I"}
    for r in training.values():  # a step of the paper preset is TFLOPs; 8 GPUs take an eighth of the hours
        assert 0.05 < r["tflop_per_step"] < 1e3 and r["hours_8xA100"] == pytest.approx(r["hours_1xA100"] / 8)


def test_the_diffusers_twin_takes_our_inputs_and_the_ddim_steps_agree():
    pytest.importorskip("diffusers")
    cfg = L2IConfig.preset("tiny")
    cfg.conditioning = "channel"
    twin = bench.diffusers_twin(cfg)
    x = torch.randn(2, cfg.latent_channels * 5, cfg.latent_size, cfg.latent_size)
    assert twin(x, torch.tensor([3, 999]), return_dict=False)[0].shape == (2, cfg.latent_channels, 16, 16)
    row = bench.ddim_side_by_side(cfg, batch=2, reps=1)
    assert row["max_abs_diff"] < 1e-5


def test_flop_counter_counts_attention():
    q = torch.randn(1, 2, 64, 16)
    assert bench.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q)) >= 2 * 2 * 64 * 64 * 16


def test_masked_latents_encode_each_source_and_box_once():
    model = DreamHead.from_checkpoints(device="cpu")
    images = torch.rand(4, 3, 64, 64) * 2 - 1
    images[2] = images[0]  # frames 0 and 2: the same source crop and mouth box
    source, boxes = [0, 1, 0, 1], [[10, 30, 50, 50], [10, 30, 50, 50], [10, 30, 50, 50], [12, 30, 50, 50]]
    calls = []
    encode = model.vae.encode_latents
    model.vae.encode_latents = lambda x: (calls.append(len(x)), encode(x))[1]
    latents = MaskedLatents(model.vae)(source, boxes, images)
    assert calls == [3]
    torch.testing.assert_close(latents, encode_conditions(model.vae, {"mask": images})["mask"], rtol=0, atol=1e-5)
