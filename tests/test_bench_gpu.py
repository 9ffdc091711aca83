"""benchmarks/bench_gpu.py's code paths on the CPU with the tiny model, at a tiny scale:
the synthetic data, each kind of job (plain TRL, the recipe through sft_qlora, packing,
previews, rollouts, GRPO, the profiler), the child-process runner and the table."""

from __future__ import annotations

import math
import shutil
import statistics
import sys

import pytest
from conftest import ROOT, needs_compiler

from phi2qlora.chat import format_chat
from phi2qlora.model import load_chat_tokenizer

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_gpu as bench  # noqa: E402

TINY = {  # the T4 recipes, scaled down so that a CPU runs each job in seconds
    "recipe_overrides": ["--per_device_train_batch_size", "2", "--max_length", "256", "--preview_max_new_tokens", "4"],
    "plain_overrides": {"per_device_train_batch_size": 2, "max_length": 256},
    "grpo_overrides": ["--max_completion_length", "6", "--per_device_train_batch_size", "4",
                       "--gradient_accumulation_steps", "1", "--num_generations", "4", "--max_prompt_tokens", "64"],
    "rollout_overrides": {"batch": 3, "new_tokens": 5, "repeats": 2},
}


@pytest.fixture(scope="module")
def ctx(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    shutil.copytree(tiny_model_dir, root / "model")  # gelu variants are made beside it
    args = bench.parse_args(["--tiny", "--model_dir", str(root / "model"), "--work", str(root / "work"),
                             "--out", str(root / "out"), "--steps", "2", "--warmup", "1", "--profile_steps", "1",
                             "--train_examples", "60"])
    ctx = {**bench.prepare(args), **TINY}
    adapter = bench.run_job_here(bench.ensure_adapter(ctx), ctx)
    assert adapter["ok"], adapter
    return ctx


def test_synthetic_lengths_are_seeded_and_oasst_like(tiny_model_dir):
    tokenizer = load_chat_tokenizer(str(tiny_model_dir))
    rows = bench.synth_conversations(tokenizer, 300, seed=0)
    assert rows == bench.synth_conversations(tokenizer, 300, seed=0)
    assert rows != bench.synth_conversations(tokenizer, 300, seed=1)
    lengths = [len(tokenizer(format_chat(r["messages"]), add_special_tokens=False)["input_ids"]) for r in rows]
    assert 160 < statistics.median(lengths) < 220  # median ~190 tokens
    assert 0.1 < sum(n > 256 for n in lengths) / len(lengths) < 0.35  # a lognormal tail that the cut at 256 trims


def test_median_tokens_2000_fills_every_row(tiny_model_dir, tmp_path):
    """The data for the one-GPU against two-GPU comparison: every row cut at 256, so every
    step carries the same tokens whichever process draws it."""
    args = bench.parse_args(["--tiny", "--model_dir", str(tiny_model_dir), "--work", str(tmp_path), "--out",
                             str(tmp_path / "out"), "--train_examples", "100", "--ctx_json", '{"median_tokens": 2000}'])
    ctx = bench.prepare(args)
    tokenizer = load_chat_tokenizer(str(tiny_model_dir))
    rows = [bench.json.loads(line) for line in open(ctx["train_file"], encoding="utf-8")]
    lengths = [len(tokenizer(format_chat(r["messages"]), add_special_tokens=False)["input_ids"]) for r in rows]
    assert len(rows) == 100 and sum(n >= 256 for n in lengths) >= 98


def test_sft_jobs_count_real_tokens(ctx):
    # The timer sums the tokens on the device; here the Trainer counts them too, to compare.
    # --cprofile: the timed steps' Python, the Trainer's step among it.
    ctx = {**ctx, "check_token_count": True, "cprofile": True}
    plain = bench.run_job_here(bench.ALL_JOBS["trl-defaults"], ctx)
    padded = bench.run_job_here(bench.ALL_JOBS["recipe-seed"], ctx)
    packed = bench.run_job_here(bench.ALL_JOBS["+packing"], ctx)
    for r in (plain, padded, packed):
        assert r["ok"] and r["finite"] and r["steps_timed"] == 2, r
        assert r["tokens"] == r["trainer_tokens"] and all(r["tokens"]), r
        assert r["step_s_min"] <= r["step_s"] <= r["step_s_max"]
        assert math.isclose(r["tok_s"], r["tokens_per_step"] / statistics.mean([r["step_s_min"], r["step_s_max"]]),
                            rel_tol=0.5)
    # Two rows of at most 256 tokens a step, counted without their padding (seeded: not all full).
    assert 0 < padded["tokens_per_step"] < 2 * 256 and padded["batch"] == 2 and not padded["packing"]
    assert sum(padded["tokens"]) == padded["tokens_per_step"] * 2 and len(padded["times"]) == 2
    # Plain TRL loads Phi-2's gelu_new; the project's loader swaps in the one-kernel tanh gelu.
    assert plain["activation"] == "NewGELUActivation" and padded["activation"] == "GELUTanh"
    assert (plain["kernels_per_step"] if "kernels_per_step" in plain else 0) == 0  # the CPU has no kernels to count
    assert (bench.Path(ctx["out"]) / "profile_trl-defaults.json").is_file()
    python = (bench.Path(ctx["out"]) / "cprofile_recipe-seed.txt").read_text()
    assert "function calls" in python and "training_step" in python
    # Previews: one at the start, one at the end; their share at the recipe's cadence.
    every = bench.recipe_value(ctx["sft_recipe"], "preview_steps")
    assert padded["previews"] == 2 and padded["preview_every"] == every > 1
    expected = padded["preview_s"] / (padded["preview_s"] + every * padded["step_s"])
    assert math.isclose(padded["preview_share"], expected)


def test_grpo_step_and_rollout_jobs(ctx):
    grpo = bench.run_job_here(dict(bench.ALL_JOBS["grpo-step"], steps=2, warmup=1), ctx)
    assert grpo["ok"] and grpo["steps"] == 2 and grpo["steps_timed"] == 1 and grpo["finite"], grpo
    assert grpo["completions_per_step"] == 4
    # The phase clock: each phase timed within the step, the methods it wrapped given back.
    from accelerate import Accelerator
    from trl import GRPOTrainer

    originals = GRPOTrainer._generate, Accelerator.backward
    phased = bench.run_job_here(dict(bench.ALL_JOBS["grpo phases"], steps=3, warmup=1), ctx)
    assert phased["ok"] and phased["steps_timed"] == 2, phased
    phases = {k: v for k, v in phased.items() if k.startswith("phase_")}
    assert set(phases) == {"phase_rollouts_s", "phase_no_grad_log_probs_s", "phase_policy_forward_s",
                           "phase_backward_s"}, phases
    assert all(v > 0 for v in phases.values()) and sum(phases.values()) < phased["step_s"] * 1.05, phased
    assert (GRPOTrainer._generate, Accelerator.backward) == originals
    assert "rollouts " in bench.table([phased])
    # The rollout in its own process, as the benchmark runs every job.
    rollout = bench.run_job_isolated(bench.ALL_JOBS["rollout"], ctx, timeout=300)
    assert rollout["ok"], rollout
    assert rollout["tokens_per_step"] == 3 * 5 and rollout["steps_timed"] == 2  # every sequence ran the full length
    fast = bench.run_job_here(bench.ALL_JOBS["rollout fast"], ctx)
    assert fast["ok"] and fast["tokens_per_step"] == 3 * 5 and fast["steps_timed"] == 2, fast
    # On the CPU in fp32 the fast path's greedy answers are plain generate's, token for token.
    assert fast["greedy_rows_same"] == 1.0 and fast["graph_equals_eager"]
    assert "first token 100% same" in bench.table([fast])


def test_export_and_app_jobs(ctx):
    """The T4 set's export and app jobs, at the tiny scale: in fp32 on the CPU the merged
    export (saved in fp16) answers as the trained model, and every column's streamed answer grows into
    generate_answers' own."""
    export = bench.run_job_here(bench.ALL_JOBS["t4 export"], ctx)
    assert export["ok"] and export["finite"], export
    assert export["export_same_greedy_answers"] == export["export_prompts"] == 4
    assert export["export_max_logit_diff"] < 0.05  # saved in fp16 (seen: 0.005)
    app = bench.run_job_here(bench.ALL_JOBS["t4 app"], ctx)
    assert app["ok"] and app["finite"] and app["streams_ok"], app
    assert set(app["columns"]) == {"base", "sft", "grpo"}
    assert all(c["updates"] >= 2 for c in app["columns"].values())
    text = bench.table([export, app])
    assert "4/4 greedy answers as trained" in text and "MISMATCH" not in text and "sft " in text


def test_loss_match_jobs_compare_the_two_paths(ctx):
    """The "match" pair at tiny scale: the fast layers' logged losses against the generic
    path's, step by step, in the table. On the CPU in fp32 they agree to rounding."""
    jobs = [dict(bench.ALL_JOBS[name], steps=3) for name in ("match generic", "match fast")]
    results = [bench.run_job_here(job, ctx) for job in jobs]
    assert all(r["ok"] and len(r["losses"]) == 3 for r in results), results
    assert [r["layers"] for r in results] == ["generic", "fast"]
    assert "generic layers" in bench.table(results[:1]) and "fast layers" in bench.table(results[1:])
    bench.compare_losses(results, jobs)
    match = results[1]["loss_match"]
    assert match["vs"] == "match generic" and match["steps"] == 3 and match["max_rel"] < 1e-5, match
    assert results[0]["losses"] != [results[0]["losses"][0]] * 3  # real, changing losses were compared
    assert "losses vs match generic: 3 steps" in bench.table(results)


@needs_compiler()
def test_compile_jobs_report_compile_time_and_graphs(ctx):
    """The compiled jobs say how long torch.compile took and how many graphs it built, in
    the timed steps too (new lengths recompiling would show there); a job's own choice of
    compiled ops lasts for that job only."""
    from phi2qlora import fast_training as ft

    default, default_ops = ft.COMPILED_OPS, ft._COMPILED_OPS
    job = dict(bench.ALL_JOBS["g64 ckpt compile all"], steps=2, warmup=1, profile=False)
    result = bench.run_job_here(job, ctx)
    assert result["ok"] and result["layers"] == "fast", result
    # heads, attend and act at least: norm and residual may reuse graphs an earlier test built
    assert result["graphs_compiled"] >= 3 and result["compile_s"] > 0, result
    assert result["graphs_compiled_timed"] == 0, result
    assert ft.COMPILED_OPS == default and ft._COMPILED_OPS is default_ops and "compiled" in bench.table([result])


def test_t4_projection_scales_products_by_flops_and_the_rest_by_bandwidth():
    ceilings = {"matmul_flops": 10 * bench.T4_FLOPS, "copy_bytes_s": 4 * bench.T4_BYTES_S}
    job = {"gpu_ms_by_kind": {"products": 30.0, "other": 20.0}, "profile_tokens_per_step": 1000}
    projected = bench.t4_projection(job, ceilings)
    assert projected["t4_step_s"] == pytest.approx((30 * 10 + 20 * 4) / 1e3)
    assert projected["t4_tok_s"] == pytest.approx(1000 / 0.38) and projected["gpu_us_per_token"] == pytest.approx(50)
    assert bench.t4_projection({"tokens_per_step": 10}, ceilings) == {}  # no profile, no projection
    assert projected["products_share"] == pytest.approx(0.6)
    assert bench.kernel_kind("sm90_xmma_gemm_bf16bf16_bf16f32") == "products"
    assert bench.kernel_kind("fmha_cutlassF_f16_aligned_64x64_rf_sm80") == "products"
    assert bench.kernel_kind("void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add>") == "other"


def test_idle_gaps_are_charged_to_the_host_ops_they_overlap():
    kernels = [(0, 100), (90, 200), (500, 600), (610, 700), (1000, 1100)]  # gaps 200-500 and 700-1000 (610: too short)
    ops = [(150, 400, "Optimizer.step#AdamW.step"), (450, 520, "aten::mm"),
           (650, 900, "enumerate(DataLoader)#_SingleProcessDataLoaderIter.__next__")]
    idle = bench.idle_by_host_op(kernels, ops)
    assert idle.pop("(all)") == 600
    assert idle == {"enumerate(DataLoader)": 200, "Optimizer.step": 200, "(Python between ops)": 150, "aten::mm": 50}
    assert list(idle)[-1] == "aten::mm"  # largest first


def test_table_shows_failures_and_figures():
    rows = [{"name": "a", "kind": "sft", "ok": True, "tok_s": 1234.0, "tok_s_min": 1000.0, "tok_s_max": 1500.0,
             "step_s": 0.5, "tokens_per_step": 617, "peak_alloc_gib": 3.25, "peak_reserved_gib": 4.0, "batch": 8,
             "grad_ckpt": True, "packing": False, "activation": "GELUTanh", "finite": False},
            {"name": "b", "kind": "grpo", "ok": False, "error": "OutOfMemoryError: boom"}]
    text = bench.table(rows)
    assert "1234" in text and "1000-1500" in text and "3.25" in text and "NaN!" in text
    assert "FAILED: OutOfMemoryError: boom" in text


def last_value(args: list[str], flag: str) -> str | None:
    values = [args[i + 1] for i, a in enumerate(args[:-1]) if a == flag]
    return values[-1] if values else None


def test_jobs_say_which_layers_train():
    """`--fast_training auto` picks the fast layers on a GPU, so a job measuring the generic
    path must ask for it, or the GPU runs the fast layers under the generic job's name (it
    did once). SFT jobs built on the seed's values spell their layers out."""
    for job in bench.ALL_JOBS.values():
        asked = last_value(job.get("args", []), "--fast_training")
        if "generic" in job["name"]:
            assert asked == "false", job["name"]
        if job["kind"] == "sft" and not job.get("plain") and not job.get("recipe_as_is"):
            assert asked is not None, job["name"]


def test_unknown_job_is_refused():
    with pytest.raises(SystemExit, match="unknown job"):
        bench.select_jobs("h100,nope")
    assert [j["name"] for j in bench.select_jobs("rollout,grpo-step")] == ["rollout", "grpo-step"]


def test_dpo_jobs(ctx):
    """The 'dpo' set at tiny scale: both references, their figures and the table's notes.
    Each job writes exactly the pairs its steps use."""
    small = {**ctx, "check_token_count": True, "dpo_overrides": ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
                                      "--max_length", "128", "--max_prompt_tokens", "64"]}
    results = [bench.run_job_here(dict(job, steps=2, warmup=1), small) for job in bench.JOBS["dpo"]]
    for r in results:
        assert r["ok"] and r["finite"] and r["steps"] == 2 and r["steps_timed"] == 1, r
        assert r["pairs_per_step"] == 2 and len(r["losses"]) == 2 and r["losses"][0] == pytest.approx(math.log(2))
        assert r["setup_s"] > 0 and r["step_s_min"] <= r["step_s"] <= r["step_s_max"]
        assert r["tokens"] == r["trainer_tokens"] and all(r["tokens"]), r  # the timer's count is the Trainer's
    assert [r["reference"] for r in results] == ["ref adapter", "precomputed"] * 2
    for generic, fast in zip(results[:2], results[2:]):  # the same steps on the fast layers
        assert fast["name"] == generic["name"] + " fast" and fast["losses"] == pytest.approx(generic["losses"], rel=1e-4)
    text = bench.table(results)
    assert "2 steps, 2 pairs/step, reference ref adapter" in text and "reference precomputed" in text
    rows = [bench.json.loads(line) for line in open(bench.Path(ctx["work"]) / "pairs_4.jsonl", encoding="utf-8")]
    assert len(rows) == 4 and all(r["chosen"] != r["rejected"] for r in rows)
    assert [j["name"] for j in bench.select_jobs("dpo")] == ["t4 dpo recipe", "t4 dpo precompute",
                                                              "t4 dpo recipe fast", "t4 dpo precompute fast"]
