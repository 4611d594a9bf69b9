"""segmerge-bench --model mask2former-...: one row per knob setting, and equality with transformers (tiny configs)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers", reason="transformers is a test dependency: run `make setup`")

from segmerge_ros.models.mask2former.deformable_attention import coarse_layers_for_rate
from segmerge_ros.bench import bench

from segmerge_ros.bench import bench_mask2former
TINY = {"num_queries": 6, "feature_size": 32, "mask_feature_size": 32, "hidden_dim": 32, "num_attention_heads": 4,
        "encoder_feedforward_dim": 64, "decoder_feedforward_dim": 64, "num_decoder_layers": 3, "num_classes": 5}
TINY_SWIN = {**TINY, "swin.embed_dim": 32, "swin.depths": [1, 1, 2, 1], "swin.num_heads": [1, 2, 2, 4],
             "swin.window_size": 4}
TINY_MIT = {**TINY, "mit.hidden_sizes": [16, 32, 48, 64], "mit.depths": [1, 1, 1, 1], "mit.num_heads": [1, 1, 2, 2]}


def run(tmp_path, model: str, overrides: dict, size: str = "64x96", via_segmerge_bench: bool = False) -> dict:
    path = tmp_path / "result.json"
    argv = ["--model", model, "--size", size, "--repeats", "1", "--config-overrides", json.dumps(overrides),
            "--json", str(path)]
    (bench.main if via_segmerge_bench else bench_mask2former.main)(argv)
    return json.loads(path.read_text())


def test_swin_rows_per_knob_setting_and_equal_to_transformers(tmp_path, capsys):
    result = run(tmp_path, "mask2former-swin-t", TINY_SWIN, via_segmerge_bench=True)  # segmerge-bench dispatches
    (entry,) = result["sizes"]
    assert entry["size"] == [64, 96]
    rows = entry["rows"]
    assert [row["name"] for row in rows] == ["transformers"] + [f"ours k={k}" for k in range(6)]
    # every knob setting the rate mapping reaches, each once, with the smallest rate selecting it
    assert [(row["coarse_layers"], row["min_rate"]) for row in rows[1:]] == [
        (coarse_layers_for_rate(rate, 6), rate) for rate in (0.0, 0.15, 0.3, 0.45, 0.6, 0.75)]
    hf = rows[0]
    assert hf["max_abs_class_logit_diff_vs_ours"] <= 1e-4
    assert hf["max_abs_mask_logit_diff_vs_ours"] <= 1e-4
    assert hf["agreement_vs_k0"] == 1.0
    assert hf["max_abs_mask_logit"] > 1.0 and hf["max_abs_class_logit"] > 0.5  # the equality is not of zeros
    k0, k5 = rows[1], rows[-1]
    assert k0["speedup_vs_k0"] == 1.0 and k0["agreement_vs_k0"] == 1.0 and k0["macs_share_vs_k0"] == 1.0
    # each coarse layer removes the res3 tokens from one encoder layer: strictly fewer MACs per setting
    shares = [row["macs_share_vs_k0"] for row in rows[1:]]
    assert all(a > b for a, b in zip(shares, shares[1:]))
    assert k5["gmac_encoder_layers"] < k0["gmac_encoder_layers"]
    assert all(len(row["times_ms"]) == 1 and row["median_ms"] == row["best_ms"] > 0 for row in rows)
    assert "random weights" in result["notes"][0]
    printed = capsys.readouterr().out
    assert "ours k=5" in printed and "transformers" in printed


def test_proscale_mit_rows_follow_the_schedule_and_skip_transformers(tmp_path, capsys):
    overrides = {**TINY_MIT, "proscale_schedule": [1, 1, 3]}
    result = run(tmp_path, "mask2former-mit-b0-proscale", overrides, size="64x64")
    rows = result["sizes"][0]["rows"]
    # a PRO-SCALE model's knob runs k of its p3 = 3 full-scale layers on res5 + res4: k in 0..2
    assert [row["coarse_layers"] for row in rows] == [0, 1, 2]
    assert result["encoder"] == "proscale (1, 1, 3)"
    assert any("no transformers column" in note for note in result["notes"])
    assert all(row["max_abs_class_logit_diff_vs_ours"] is None for row in rows)
    assert "no transformers column" in capsys.readouterr().err


def test_config_overrides_reach_the_backbone():
    config = bench_mask2former.config_with_overrides("mask2former-swin-t", json.dumps(TINY_SWIN))
    assert config.swin.depths == (1, 1, 2, 1) and config.swin.window_size == 4 and config.num_queries == 6
    with pytest.raises(SystemExit, match="config-overrides"):
        bench_mask2former.config_with_overrides("mask2former-swin-t", {"swin.no_such_field": 1})


def test_requested_only_for_mask2former_models():
    assert bench_mask2former.requested(["--model", "mask2former-r50", "--size", "64x64"])
    assert bench_mask2former.requested(["--model=mask2former-mit-b0-proscale"])
    assert not bench_mask2former.requested(["--model", "segformer-b0"])
    assert not bench_mask2former.requested([])


def test_random_weights_are_seeded_and_scaled():
    from segmerge_ros.models.mask2former.model import Mask2Former

    config = bench_mask2former.config_with_overrides("mask2former-swin-t", TINY_SWIN)
    a = bench_mask2former.randomise_weights(Mask2Former(config), seed=3).state_dict()
    b = bench_mask2former.randomise_weights(Mask2Former(config), seed=3).state_dict()
    key = "pixel_level_module.decoder.encoder.layers.0.self_attn.attention_weights.weight"
    assert np.array_equal(a[key].numpy(), b[key].numpy())
    assert a[key].abs().max() > 0  # the fresh model's zero attention logits were replaced


def test_weights_of_a_distilled_checkpoint_are_benchmarked(tmp_path):
    from segmerge_ros.models.mask2former.model import Mask2Former
    from segmerge_ros.training.train_mask2former import save_checkpoint

    config = bench_mask2former.config_with_overrides("mask2former-mit-b0-proscale", TINY_MIT)
    model = bench_mask2former.randomise_weights(Mask2Former(config), seed=5)
    save_checkpoint(model, tmp_path / "model", {})
    path = tmp_path / "result.json"
    bench_mask2former.main(["--model", "mask2former-mit-b0-proscale", "--weights", str(tmp_path / "model"),
                            "--size", "64x64", "--repeats", "1", "--json", str(path)])
    result = json.loads(path.read_text())
    assert "segmerge-train mask2former" in result["weights"] and result["encoder"] == "proscale (3, 3, 3)"
    assert [row["coarse_layers"] for row in result["sizes"][0]["rows"]] == [0, 1, 2]
    assert not any("random weights" in note for note in result["notes"])
    with pytest.raises(SystemExit, match="not mask2former-mit-b0$"):
        bench_mask2former.main(["--model", "mask2former-mit-b0", "--weights", str(tmp_path / "model"),
                                "--size", "64x64"])
