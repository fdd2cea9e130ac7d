import json

import pytest

from minigpt import bench
from minigpt.experiments import mean_ci


def test_bench_run_reports_what_it_promises():
    run = bench.run_one(threads=1, iters=60, seed=0, bare_iters=3)
    json.dumps(run)  # the report is plain JSON
    assert run["parameters"] == 795_904
    assert run["ms_per_iter"]["q1"] <= run["ms_per_iter"]["median"] <= run["ms_per_iter"]["q3"]
    assert run["tokens_per_s"] == pytest.approx(12 * 64 / (run["ms_per_iter"]["median"] / 1000))
    assert list(run["val_loss_every_250"]) == [0, 60]  # step 0, then the end
    assert run["final_val_loss_full_split"] < run["val_loss_every_250"][0]
    assert run["bare_loop_ms_per_iter_before"]["median"] > 0 and run["time_vs_bare_loop"] > 0


def test_mean_ci():
    ci = mean_ci([1.0, 2.0, 3.0])
    # mean 2, sample sd 1, t(0.975, df=2) = 4.3027
    assert ci.mean == 2.0 and ci.n == 3
    assert ci.half_width == pytest.approx(4.302653 / 3 ** 0.5, rel=1e-6)
    assert mean_ci([5.0, 5.0]).half_width == 0.0
    assert all(type(v) is float for v in (ci.mean, ci.low, ci.high, ci.half_width))  # glue needs plain floats
    with pytest.raises(ValueError, match="at least 2"):
        mean_ci([1.0])
    with pytest.raises(ValueError, match="confidence"):
        mean_ci([1.0, 2.0], confidence=1.5)
    with pytest.raises(ValueError, match="finite"):
        mean_ci([1.0, float("nan")])


def test_nanogpt_reference_loop_runs():
    run = bench.nanogpt_reference_run(seed=1337, iters=30)
    assert list(run["val_loss_every_250"]) == [0, 30]
    assert run["final_val_loss_full_split"] < run["val_loss_every_250"][0]


def test_loss_bench_runs_small():
    from minigpt import loss_bench

    for name in ("F.cross_entropy", "minigpt softmax_focal_loss", "minigpt sft_loss sequence_mean"):
        result = loss_bench.run_one(name, n=64, vocab=100, repeats=2)
        assert result["seconds"] > 0 and result["seconds"] <= result["seconds_median"]
        assert len(result["times"]) == 2


def test_loss_bench_measures_the_output_layer_losses():
    from minigpt import loss_bench

    results = loss_bench.measure(list(loss_bench.LINEAR_LOSSES), n=64, vocab=500, repeats=1, hidden=8, chunk=16,
                                 reference="F.linear + F.cross_entropy")
    assert [r["loss"] for r in results] == list(loss_bench.LINEAR_LOSSES)
    fused = results[-1]
    assert fused["chunk"] == 16 and fused["hidden"] == 8
    assert fused["gradients_in_logits"] == (64 * 8 + 500 * 8) / (64 * 500)
    assert results[0]["time_vs_reference"] == 1.0
    with pytest.raises(ValueError, match="names holds an unknown loss"):
        loss_bench.measure(["no such loss"], n=8, vocab=10)


def test_loss_bench_sweeps_sizes_and_chunks_in_one_process():
    from minigpt import loss_bench

    results = loss_bench.measure(["minigpt linear_cross_entropy", "F.linear + F.cross_entropy"], n=(32, 64),
                                 vocab=200, repeats=1, hidden=4, chunk=(8, 16), reference="F.linear + F.cross_entropy")
    assert [(r["n"], r["chunk"]) for r in results][::2] == [(32, 8), (32, 16), (64, 8), (64, 16)]
    assert all(r["time_vs_reference"] == 1.0 for r in results if r["loss"] == "F.linear + F.cross_entropy")


def test_gpu_configuration_runs_on_any_device():
    # nanoGPT's GPU model at full size, cut to a few updates of two sequences so that it runs on a CPU.
    run = bench.run_gpu(iters=3, seed=0, bare_iters=2, eval_iters=1, device="cpu", batch_size=2, bare_warmup=0,
                        full_split=False)
    json.dumps(run)
    assert run["parameters"] == 10_646_784  # nanoGPT: "number of parameters: 10.65M"
    assert run["config"]["n_layer"] == 6 and run["config"]["block_size"] == 256 and run["config"]["dropout"] == 0.2
    assert list(run["val_loss_every_250"]) == [0, 3]
    assert run["tokens_per_s"] == pytest.approx(2 * 256 / (run["ms_per_iter"]["median"] / 1000))
    assert run["time_vs_bare_loop"] > 0 and run["at_most_1_47"] is False
