"""segmerge-bench --model mask2former-...: one row per knob setting, and equality with transformers (tiny configs)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers", reason="transformers is a test dependency: run `make setup`")

from segmerge_ros.models.mask2former.deformable_attention import coarse_layers_for_rate
from segmerge_ros.bench import bench, bench_mask2former
from segmerge_ros.bench.common import is_mask2former

TINY = {"num_queries": 6, "feature_size": 32, "mask_feature_size": 32, "hidden_dim": 32, "num_attention_heads": 4,
        "encoder_feedforward_dim": 64, "decoder_feedforward_dim": 64, "num_decoder_layers": 3, "num_classes": 5}
TINY_SWIN = {**TINY, "swin.embed_dim": 32, "swin.depths": [1, 1, 2, 1], "swin.num_heads": [1, 2, 2, 4],
             "swin.window_size": 4}
TINY_MIT = {**TINY, "mit.hidden_sizes": [16, 32, 48, 64], "mit.depths": [1, 1, 1, 1], "mit.num_heads": [1, 1, 2, 2]}


def run(tmp_path, model: str, overrides: dict, size: str = "64x96", extra: list[str] = ("--repeat", "1")) -> dict:
    path = tmp_path / "result.json"
    argv = ["--model", model, "--size", size, "--config-overrides", json.dumps(overrides), "--json", str(path),
            *extra]
    assert bench.main(argv) == 0  # segmerge-bench hands a Mask2Former to bench_mask2former.run
    return json.loads(path.read_text())


PROSCALE = ("mask2former-mit-b0-proscale", {**TINY_MIT, "proscale_schedule": [1, 1, 3]})  # k = 0..2, no transformers


@pytest.mark.parametrize("flag", ["--repeat", "--repeats"])  # --repeats: the alias documented commands used
def test_repeat_and_its_alias_set_the_rounds(tmp_path, flag):
    result = run(tmp_path, *PROSCALE, size="64x64", extra=[flag, "2"])
    assert result["repeats"] == 2
    assert all(len(row["times_ms"]) == 2 for row in result["sizes"][0]["rows"])
    assert bench.parse_args(["--model", "mask2former-r50", flag, "4"]).repeat == 4
    assert bench.parse_args(["--model", "segformer-b0", flag, "4"]).repeat == 4  # one parser, one dialect


def test_one_parser_with_each_familys_defaults():
    m2f, segformer = bench.parse_args(["--model", "mask2former-r50"]), bench.parse_args([])
    assert (m2f.repeat, m2f.max_images, m2f.presets, m2f.sizes) == (3, 1, "", ["576x768", "512x1024"])
    assert (segformer.repeat, segformer.max_images, segformer.presets, segformer.size) == (5, 9, "hq,fast,2x2", None)


def refused(capsys, argv: list[str]) -> str:
    """The one stderr line of a refused command line (exit status 2, no traceback)."""
    with pytest.raises(SystemExit) as exit_:
        bench.main(argv)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_backends_not_benchmarked_for_mask2former_are_refused_in_one_line(capsys):
    line = refused(capsys, ["--model", "mask2former-swin-t", "--backend", "compile", "--size", "64x64"])
    assert line == ("segmerge-bench: --backend compile: Mask2Former is benchmarked on eager and openvino (the compiled "
                    "and TensorRT paths are not measured for it)")
    assert "--backend tensorrt" in refused(capsys, ["--model", "mask2former-r50", "--backend", "eager,tensorrt"])
    assert "fp16" in refused(capsys, ["--model", "mask2former-r50", "--precision", "fp16"])
    assert "--presets" in refused(capsys, ["--model", "mask2former-r50", "--presets", "hq"])
    assert "--config-overrides" in refused(capsys, ["--model", "segformer-b0", "--config-overrides", "{}"])


def test_openvino_rows_beside_eager_with_their_speed_ups_and_closeness(tmp_path, capsys):
    argv = ["--repeat", "1", "--backend", "openvino", "--precision", "fp32", "--rates", "0.15",
            "--engine-cache-dir", str(tmp_path)]
    result = run(tmp_path, *PROSCALE, size="64x64", extra=argv)
    rows = {row["name"]: row for row in result["sizes"][0]["rows"]}
    # eager fp32 is always run: the reference of every other row at the same setting
    assert list(rows) == ["ours k=0", "ours k=1", "ours k=0@openvino-fp32", "ours k=1@openvino-fp32"]
    for k in range(2):
        eager, compiled = rows[f"ours k={k}"], rows[f"ours k={k}@openvino-fp32"]
        assert (compiled["backend"], compiled["precision"], compiled["coarse_layers"]) == ("openvino", "fp32", k)
        assert compiled["max_rel_class_logit_diff_vs_ours"] <= 1e-4 and compiled["max_rel_mask_logit_diff_vs_ours"] <= 1e-4
        assert compiled["agreement_vs_reference"] >= 0.999
        # ratios of the medians (which the JSON rounds to 0.01 ms)
        assert compiled["speedup_vs_eager"] == pytest.approx(eager["median_ms"] / compiled["median_ms"], rel=2e-3)
        assert compiled["speedup_vs_own_k0"] == pytest.approx(rows["ours k=0@openvino-fp32"]["median_ms"]
                                                              / compiled["median_ms"], rel=2e-3)
        assert eager["speedup_vs_eager"] is None and eager["max_rel_class_logit_diff_vs_ours"] is None
    assert not any("ran eagerly" in note for note in result["notes"])
    assert len(list(tmp_path.glob("*.xml"))) == 2  # one IR per setting, in the cache
    assert "ours k=1@openvino-fp32" in capsys.readouterr().out


def test_precision_fp32_and_backend_eager_run(tmp_path):
    result = run(tmp_path, *PROSCALE, size="64x64",
                 extra=["--repeat", "1", "--backend", "eager", "--precision", "fp32"])
    rows = result["sizes"][0]["rows"]
    assert [row["name"] for row in rows] == ["ours k=0", "ours k=1", "ours k=2"]
    assert all((row["backend"], row["precision"]) == ("eager", "fp32") for row in rows)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_runs_by_autocast_where_native_and_is_refused_elsewhere(tmp_path, capsys, monkeypatch, native):
    from segmerge_ros.inference.backends import base

    monkeypatch.setattr(base, "cpu_bf16_support", lambda: "" if native else "no native bf16 instructions (test)")
    argv = ["--repeat", "1", "--precision", "fp32,bf16", "--rates", "0.3"]
    if not native:
        line = refused(capsys, ["--model", PROSCALE[0], "--size", "64x64", *argv])
        assert line == "segmerge-bench: --precision bf16: no native bf16 instructions (test) on this CPU; use fp32"
        return
    rows = run(tmp_path, *PROSCALE, size="64x64", extra=argv)["sizes"][0]["rows"]
    k = coarse_layers_for_rate(0.3, 3)
    assert [(row["name"], row["precision"]) for row in rows] == [("ours k=0", "fp32"), (f"ours k={k}", "fp32"),
                                                                 ("ours k=0@eager-bf16", "bf16"),
                                                                 (f"ours k={k}@eager-bf16", "bf16")]
    assert rows[0]["speedup_vs_k0"] == 1.0 and all(row["median_ms"] > 0 for row in rows)  # fp32 k=0: the reference


def test_rates_select_knob_settings(tmp_path):
    rows = run(tmp_path, *PROSCALE, size="64x64",
               extra=["--repeat", "1", "--rates", "0.6,0.65"])["sizes"][0]["rows"]
    assert [row["coarse_layers"] for row in rows] == sorted({0, coarse_layers_for_rate(0.6, 3)})
    with pytest.raises(SystemExit, match="outside"):
        bench.main(["--model", PROSCALE[0], "--rates", "0.99"])


def test_swin_rows_per_knob_setting_and_equal_to_transformers(tmp_path, capsys):
    result = run(tmp_path, "mask2former-swin-t", TINY_SWIN)
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


def test_mask2former_models_go_to_their_rows():
    assert is_mask2former(bench.parse_args(["--model", "mask2former-r50", "--size", "64x64"]).model)
    assert is_mask2former(bench.parse_args(["--model=mask2former-mit-b0-proscale"]).model)
    assert not is_mask2former(bench.parse_args(["--model", "segformer-b0"]).model)
    assert not is_mask2former(bench.parse_args([]).model)


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
    bench.main(["--model", "mask2former-mit-b0-proscale", "--weights", str(tmp_path / "model"),
                            "--size", "64x64", "--repeat", "1", "--json", str(path)])
    result = json.loads(path.read_text())
    assert "segmerge-train mask2former" in result["weights"] and result["encoder"] == "proscale (3, 3, 3)"
    assert [row["coarse_layers"] for row in result["sizes"][0]["rows"]] == [0, 1, 2]
    assert not any("random weights" in note for note in result["notes"])
    with pytest.raises(SystemExit, match="not mask2former-mit-b0$"):
        bench.main(["--model", "mask2former-mit-b0", "--weights", str(tmp_path / "model"),
                                "--size", "64x64"])
