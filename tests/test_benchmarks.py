"""benchmarks/mae_throughput.py: its FLOP count against torch's counter, and a peer that is the same model;
benchmarks/loader_peers.py: its quick run in this venv, where the loader peers (an optional extra) are absent."""
import json
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from prepretrain_lit.schema import MAEConfig, ModelConfig
from prepretrain_lit.mae import mae_from_config

from project import ROOT


def load_script(name: str):
    "benchmarks/<name>.py as a module (the benchmarks are scripts, not a package)."
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module   # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


mt = load_script("mae_throughput")
TINY = ModelConfig(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, mlp_ratio=4.0,
                   decoder_embed_dim=32, decoder_depth=3, decoder_num_heads=4)


def counted_flops(fn) -> int:
    "FLOPs torch counts for `fn()`; the math attention backend, whose matmuls the counter sees (the CPU kernel it misses)."
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("m, ratio, batch", [(TINY, 0.75, 2), (TINY, 0.5, 3),
                                             (ModelConfig(img_size=24, patch_size=8, embed_dim=48, depth=1, num_heads=3,
                                                          mlp_ratio=2.0, decoder_embed_dim=24, decoder_depth=2,
                                                          decoder_num_heads=2, in_chans=1), 0.6, 2)])
def test_flop_formula_equals_torchs_count_forward_and_training(m, ratio, batch):
    torch.manual_seed(0)
    model = mae_from_config(m, MAEConfig(mask_ratio=ratio))
    imgs = torch.randn(batch, m.in_chans, m.img_size, m.img_size)
    expected = mt.mae_flops(m, ratio, batch)
    with torch.no_grad():
        assert counted_flops(lambda: model(imgs, ratio)) == expected.forward
        assert counted_flops(lambda: model.forward_encoder(imgs, ratio)) == expected.patch_embed + expected.encoder
    assert counted_flops(lambda: model(imgs, ratio)[0].backward()) == expected.train


def test_flop_parts_scale_as_expected():
    f = mt.mae_flops(TINY, 0.75, 1)
    assert mt.mae_flops(TINY, 0.75, 4).train == 4 * f.train                       # linear in the batch
    deeper = mt.mae_flops(ModelConfig(**{**TINY.__dict__, "decoder_depth": 4}), 0.75, 1)
    assert deeper.encoder == f.encoder and deeper.decoder > f.decoder            # decoder depth only moves the decoder
    assert mt.mae_flops(TINY, 0.5, 1).encoder > f.encoder                        # more visible tokens, more encoder


def test_peak_rate_lookup_prefers_the_specific_name():
    assert mt.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert mt.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert mt.peak_tflops("NVIDIA H200") == 989.0
    assert mt.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert mt.peak_tflops("Some Other GPU") is None
    assert mt.peak_tflops("NVIDIA H200 NVL") == 835.0            # not the H200 SXM's 989: the longest name found wins
    assert mt.peak_tflops("NVIDIA H100 NVL") == 835.0 and mt.peak_tflops("NVIDIA GH200 480GB") == 989.0


# -- the peer: Hugging Face's ViTMAEForPreTraining, configured as the same model -------------------------------

@pytest.mark.parametrize("norm_pix", [True, False])
def test_peer_is_the_same_model_parameters_loss_and_predictions(norm_pix):
    mae = MAEConfig(mask_ratio=0.75, norm_pix_loss=norm_pix)
    torch.manual_seed(0)
    ours, peer = mae_from_config(TINY, mae), mt.build_peer(TINY, mae)
    cfg = peer.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (64, 2, 4, 256)
    assert (cfg.decoder_hidden_size, cfg.decoder_num_hidden_layers, cfg.decoder_num_attention_heads,
            cfg.decoder_intermediate_size) == (32, 3, 4, 128)
    assert (cfg.image_size, cfg.patch_size, cfg.mask_ratio, cfg.norm_pix_loss) == (32, 4, 0.75, norm_pix)
    assert cfg._attn_implementation == "sdpa"
    assert mt.param_counts(ours) == mt.param_counts(peer)
    # the strongest check: our weights, under the peer's names, give the peer our loss and predictions
    peer.load_state_dict(mt.peer_state_dict(ours.state_dict()), strict=True)
    imgs, noise = torch.randn(3, 3, 32, 32) * 2 + 1, torch.rand(3, 64)
    with torch.no_grad():
        loss, pred, mask = ours(imgs, 0.75, noise)
        out = peer(pixel_values=imgs, noise=noise)
    assert torch.equal(mask, out.mask)
    torch.testing.assert_close(out.logits, pred, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)


def test_a_differently_configured_peer_is_told_apart():
    mae = MAEConfig()
    ours = mae_from_config(TINY, mae)
    wider = mt.build_peer(ModelConfig(**{**TINY.__dict__, "decoder_embed_dim": 48}), mae)
    assert mt.param_counts(ours) != mt.param_counts(wider)
    # same parameter count, other heads: the predictions differ
    torch.manual_seed(0)
    other_heads = mt.build_peer(ModelConfig(**{**TINY.__dict__, "num_heads": 2}), mae)
    assert mt.param_counts(ours) == mt.param_counts(other_heads)
    other_heads.load_state_dict(mt.peer_state_dict(ours.state_dict()), strict=True)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    with torch.no_grad():
        assert not torch.allclose(ours(imgs, 0.75, noise)[1], other_heads(pixel_values=imgs, noise=noise).logits, atol=1e-4)


def test_timing_alternates_between_the_sides():
    calls = []
    times = mt.interleaved_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1, iters=3,
                                 device=torch.device("cpu"))
    assert calls == ["a", "b", "b", "a"] * 2      # each side goes first in every other round
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}


def test_timing_waits_for_the_device_it_runs_on_and_times_the_first_call_apart(monkeypatch):
    "--device cuda:1: every wait is for cuda:1 (a bare synchronize() waits for cuda:0 only); the first call is timed apart."
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    first_s = {}
    mt.interleaved_times({"a": lambda: None, "b": lambda: None}, warmup=1, iters=2, device=torch.device("cuda", 1),
                         first_seconds=first_s)
    assert synced and all(d == torch.device("cuda", 1) for d in synced)
    assert set(first_s) == {"a", "b"} and all(v >= 0 for v in first_s.values())


@pytest.mark.slow
def test_the_script_runs_both_sides_from_the_same_weights_and_prints_the_table(capsys):
    torch.set_num_threads(1)
    mt.main(["--model", "tiny", "--batch", "4", "--steps", "2", "--warmup", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    losses = out.split("first-step loss (same weights, same noise): ")[1].splitlines()[0]
    ours, peer = (float(part.split()[1]) for part in losses.split(", "))
    assert ours == pytest.approx(peer, rel=1e-5)
    for row in ("train step", "encoder forward (25% visible)"):
        line = next(l for l in out.splitlines() if l.startswith(row))
        ours_ips, peer_ips, ratio = (float(v.rstrip("x")) for v in line[len(row):].split()[:3])
        assert ours_ips > 0 and peer_ips > 0 and ratio == pytest.approx(ours_ips / peer_ips, rel=1e-2)
    assert "model FLOPs per step" in out
    assert "goal: the train step at >= 80% of the measured matmul rate in fp32: " in out
    assert "goal: never slower than the peer at equal precision (fp32 both): ours/peer " in out
    assert "first step, untimed (eager" in out


@pytest.mark.slow
def test_the_script_writes_the_rows_a_gpu_check_collects(tmp_path, capsys):
    "The options the one-GPU check passes (--model --precision --device --ours-only [--compile] --json) on a CPU."
    torch.set_num_threads(1)
    path = tmp_path / "row.json"
    mt.main(["--model", "tiny", "--batch", "4", "--steps", "2", "--warmup", "1", "--device", "cpu", "--precision", "fp32",
             "--ours-only", "--no-encoder", "--matmul-size", "256", "--json", str(path)])
    row = json.loads(path.read_text())
    assert (row["model"], row["precision"], row["compile"], row["device"]) == ("tiny", "fp32", False, "cpu")
    assert set(row["images_per_s"]) == {"ours"} and row["images_per_s"]["ours"] > 0 and row["first_step_s"]["ours"] > 0
    assert row["share_of_matmul"]["ours"] > 0 and row["goal_share"] == 0.8 and row["paired_ours_over_peer"] is None
    assert row["default_precision"] in ("fp32", "bf16") and row["peer_default_precision"] == "fp32"


# -- benchmarks/loader_peers.py: our loader against webdataset, mosaicml-streaming, litdata and ImageFolder ------

def test_loader_peers_tells_an_exact_resume_from_a_reordered_or_wrong_one():
    lp = load_script("loader_peers")
    ref = [["a", "b"], ["c", "d"], ["e", "f"]]
    assert lp.verdict([["c", "d"], ["e", "f"]], ref[1:]) == "exact"
    assert lp.verdict([["d", "c"], ["e", "f"]], ref[1:]) == "same samples, other order"
    assert lp.verdict([["a", "b"], ["c", "d"], ["e", "f"]], ref[1:]).startswith("differs (6 read vs 4; 0 missing, 2 not")
    assert lp.resume_points(47, [0.1, 0.9]) == [5, 42] and lp.resume_points(3, [0.01, 0.99]) == [1, 2]


@pytest.mark.slow
def test_loader_peers_quick_run_measures_ours_and_resumes_it_exactly(tmp_path):
    "`--quick` in this venv (the peers are an optional extra): ours measured and resumed exactly, missing peers skipped."
    out = tmp_path / "peers.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "loader_peers.py"), "--quick", "--workers", "0", "2",
                          "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result) >= {"machine", "peers", "args", "throughput", "resume", "goals"}
    assert result["machine"]["cpu"] and result["args"]["images"] == 128 and result["args"]["batch_size"] == 16
    for name, dist in (("mosaicml-streaming", "streaming"), ("litdata", "litdata"), ("torchdata", "torchdata")):
        if importlib.util.find_spec(dist) is None:     # absent here: reported, skipped, never fatal
            assert result["peers"][name] == "not installed"
            assert name == "torchdata" or result["throughput"]["0"][name]["status"].startswith("not installed")
            assert f"not installed ({name})" in run.stdout
    for workers in ("0", "2"):
        rows = result["throughput"][workers]
        assert set(rows) == {"ours", "ours-generic", "webdataset", "mosaicml-streaming", "litdata", "ImageFolder"}
        for name in ("ours", "ours-generic", "ImageFolder"):
            assert rows[name]["images"] == 128, (name, rows[name])          # a whole epoch: 8 batches of 16
            assert rows[name]["images_per_s"] > 0 and rows[name]["cpu_ms_per_image"] > 0
    ours = [r for r in result["resume"] if r["loader"] == "ours"]
    assert sorted((r["workers"], r["at"], r["batch"]) for r in ours) == [(0, 0.1, 1), (0, 0.9, 7), (2, 0.1, 1), (2, 0.9, 7)]
    for r in ours:
        assert r["stream"] == "exact" and r["pixels_exact"] and r["batches"] == 8, r
        assert 0 < r["first_batch_s"] < 60 and r["cold_first_batch_s"] > 0
    goals = result["goals"]
    assert set(goals) == {"ours_ahead_of_every_peer", "generic_at_least_peers", "ratios"}
    assert "0/ImageFolder" in goals["ratios"] and "2/ImageFolder" in goals["ratios"]
    assert "goal, ours ahead of every peer" in run.stdout and "first batch s" in run.stdout


def test_checkpoint_async_tiny_run_times_both_saves_and_the_background_write(tmp_path):
    "`--preset tiny`: the synchronous save, the asynchronous one's blocking (cold, warm) and its background write."
    out = tmp_path / "ckpt.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "checkpoint_async.py"), "--preset", "tiny",
                          "--rounds", "2", "--dir", str(tmp_path), "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    row = json.loads(out.read_text())
    assert row["preset"] == "tiny" and row["rounds"] == 2 and row["cpu"] and row["checkpoint_gb"] > 0
    for key in ("sync_s", "async_blocking_warm_s", "async_blocking_cold_s", "async_background_s"): assert row[key] > 0, key
    assert row["blocking_share"] == pytest.approx(row["async_blocking_warm_s"] / row["sync_s"])
    assert "asynchronous, warm" in run.stdout and "of the synchronous save (goal <= 10%" in run.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.json"]        # its checkpoints went with its temporary folder


def test_the_gpu_checks_async_checkpoint_part_is_in_both_modes_and_runs_on_the_cpu(capsys):
    "Its GPU command trains a ViT-L/16 MAE on cuda; its CPU command, run here, emits the timings of both saves."
    check = ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--only", "async-checkpoint"]
    gpu, cpu = (subprocess.run(check + extra, capture_output=True, text=True) for extra in ([], ["--cpu-smoke"]))
    assert gpu.returncode == cpu.returncode == 0, gpu.stderr + cpu.stderr
    assert "async-checkpoint --device cuda" in gpu.stdout and "--preset tiny" in cpu.stdout
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec); spec.loader.exec_module(gpu_check)
    gpu_check.main(["async-checkpoint", "--device", "cpu", "--preset", "tiny", "--rounds", "2", "--batch", "2"])
    out = capsys.readouterr().out
    result = json.loads(out.split("RESULT ")[-1])
    assert result["part"] == "async-checkpoint" and result["ok"] and result["sync_s"] > 0 and result["async_blocking_warm_s"] > 0
    assert result["blocking_share"] == pytest.approx(result["async_blocking_warm_s"] / result["sync_s"])
    assert "tiny MAE + AdamW on cpu" in out


def test_activation_memory_tiny_run_measures_the_three_modes(tmp_path):
    "`--tiny`: each checkpointing mode measured in its own child process (RSS after forward and at the peak)."
    out = tmp_path / "memory.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "activation_memory.py"), "--tiny", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert [r["mode"] for r in doc["rows"]] == ["none", "full", "selective"] and doc["cpu"]
    assert all(r["peak_mib"] >= 0 and r["seconds"] > 0 for r in doc["rows"])
    assert "kept after forward" in run.stdout and "selective" in run.stdout


def test_compile_blocks_times_compilation_apart_from_the_steps(tmp_path):
    "aot_eager (no code generation), one step: per-block compile counted apart, the same loss as eager."
    out = tmp_path / "compile.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_blocks.py"), "--backend", "aot_eager",
                          "--steps", "1", "--batch", "2", "--variants", "eager,blocks", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    eager, blocks = json.loads(out.read_text())["rows"]
    assert eager["compile_s"] == 0 and blocks["compile_s"] > 0 and blocks["first_step_s"] >= blocks["compile_s"]
    assert blocks["losses"] == pytest.approx(eager["losses"], rel=1e-5)
