"""Data-parallel calibration: 2 processes under torchrun (gloo, CPU) against 1 process.

The module fixture starts ``torchrun --nproc_per_node 2`` on this file (the
``__main__`` block below is the per-rank script, written the way a user's
oneshot script is: join the group, take this rank's share of the data, call
oneshot). While the ranks run, the same recipes run here in one process on all
the samples. The tests then compare, weight by weight, the masks of every
rank with the single-process masks, and the statistics behind them.

Both runs use one thread per process, so each sample's forward pass is bitwise
the same in both (matmul kernels may sum in another order with more threads).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

NUM_SAMPLES = 6  # 3 per rank
WORLD = 2
CONFIGS = ("das_wanda", "tamp", "tamp_private")  # masks equal to one process's, bit for bit
SPARSEGPT = "tamp_sparsegpt"  # float32 Hessians summed over ranks: equal up to rounding


def build(folder: Path):
    from tamp_modifier.testing.synthetic import build_tiny_model, make_calibration_dataset, save_tiny_model

    model = build_tiny_model("llava", seed=3)
    tokenizer = save_tiny_model(model, folder)
    data = make_calibration_dataset(model, NUM_SAMPLES, seed=21, text_tokens=30)
    return model, tokenizer, data


def recipe(config: str):
    from tamp_modifier import AdaptiveInputActivation, DiversityAwareSparsity
    from tamp_modifier.text_decoder import TOWER_IGNORE

    selection = "all" if config == "das_wanda" else "amia"  # `all` is Wanda's rule
    reconstruction = "sparsegpt" if config == SPARSEGPT else "wanda"
    return [DiversityAwareSparsity(),
            AdaptiveInputActivation(sparsity=0.5, token_selection=selection, reconstruction=reconstruction,
                                    targets=["Linear"], ignore=TOWER_IGNORE)]


def run(config: str, model, tokenizer, data, output_dir=None) -> dict:
    """One oneshot run; its masks, reports, and the channel norms the masks came from."""
    from conftest import language_linears, run_oneshot

    from tamp_modifier.modifiers.layer_statistics import ChannelNorms
    from tamp_modifier.report.sections import attached_report

    norms = {}
    names = {id(m): n for n, m in model.named_modules()}
    original = ChannelNorms.result

    def recording_result(self, module, *args):  # runs on the rank that owns the module
        norms[names[id(module)]] = torch.sqrt(self.sq_sums[module] / self.totals[module]).cpu()
        return original(self, module, *args)

    ChannelNorms.result = recording_result
    try:
        run_oneshot(model, tokenizer, data, recipe(config), output_dir=output_dir)
    finally:
        ChannelNorms.result = original
    report = attached_report(model)
    return {
        "masks": {n: (m.weight == 0).clone() for n, m in language_linears(model).items()},
        "weights": ({n: m.weight.detach().clone() for n, m in language_linears(model).items()}
                    if config == SPARSEGPT else None),
        "das": {n: (v["score"], v["assigned"]) for n, v in report["das"]["layers"].items()},
        "das_tokens": report["das"]["tokens"],
        "amia": {n: (v["selected"], v["tokens"]) for n, v in report["amia"]["layers"].items()},
        "samples": {n: v.get("samples") for n, v in report["amia"]["layers"].items()},
        "losses": {n: v.get("loss") for n, v in report["amia"]["layers"].items()},
        "ranks": (report["das"]["ranks"], report["amia"]["ranks"]),
        "norms": norms,
    }


def expect_error(fn) -> str:
    try:
        fn()
    except ValueError as error:
        return str(error)
    return "no error"


def rank_main(out: Path) -> None:
    """Per-rank script (run by torchrun): every config, then the two refusals."""
    from compressed_tensors.offload import set_onload_device
    from conftest import run_oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    from tamp_modifier import DiversityAwareSparsity
    from tamp_modifier.modifiers.distributed import barrier, init_distributed, rank, rank_share
    from tamp_modifier.text_decoder import TOWER_IGNORE

    torch.set_num_threads(1)
    r = int(os.environ["RANK"])
    # Offloaded before the group exists: a private CPU copy per rank, as a model
    # on each rank's GPU is (after init, compressed-tensors shares rank 0's memory).
    private = build(out / f"private-{r}")
    set_onload_device(private[0], "cpu")
    init_distributed()
    results = {}
    for config in (*CONFIGS, SPARSEGPT):
        model, tokenizer, data = private if config == "tamp_private" else build(out / f"{config}-{r}")
        saved = out / "saved" if config == "tamp" else None  # written by rank 0 alone
        results[config] = run(config, model, tokenizer, rank_share(data), output_dir=saved)
    model, tokenizer, data = build(out / f"errors-{r}")
    wanda = [DiversityAwareSparsity(),
             WandaPruningModifier(sparsity=0.5, targets=["Linear"], ignore=TOWER_IGNORE)]
    results["wanda_refused"] = expect_error(lambda: run_oneshot(model, tokenizer, rank_share(data), wanda))
    model, tokenizer, data = build(out / f"whole-{r}")
    results["same_samples"] = expect_error(lambda: run_oneshot(model, tokenizer, data, recipe("tamp")))
    torch.save(results, out / f"rank{rank()}.pt")
    barrier()  # leave together: a rank exiting with a live group can abort in gloo's threads
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(single-process results, [rank 0 results, rank 1 results], the ranks' folder)."""
    out = tmp_path_factory.mktemp("distributed")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
               __file__, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ranks = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the one-process reference runs while the ranks start up
        single = {}
        for config in ("das_wanda", "tamp", SPARSEGPT):
            model, tokenizer, data = build(out / f"single-{config}")
            single[config] = run(config, model, tokenizer, data)
        single["tamp_private"] = single["tamp"]
    finally:
        torch.set_num_threads(threads)
        log, _ = ranks.communicate(timeout=600)
    assert ranks.returncode == 0, log[-6000:]
    return single, [torch.load(out / f"rank{r}.pt") for r in range(WORLD)], out


@pytest.mark.parametrize("config", CONFIGS)
def test_masks_of_every_rank_equal_the_single_process_masks(runs, config):
    single, ranks, _ = runs
    expected = single[config]["masks"]
    pruned = sum(int(m.sum()) for m in expected.values()) / sum(m.numel() for m in expected.values())
    assert 0.45 < pruned < 0.55  # the reference really pruned
    for r, result in enumerate(ranks):
        assert result[config]["masks"].keys() == expected.keys()
        for name, mask in expected.items():
            assert torch.equal(result[config]["masks"][name], mask), f"rank {r}, {config}: {name}"


@pytest.mark.parametrize("config", CONFIGS)
def test_statistics_are_summed_over_all_ranks(runs, config):
    single, ranks, _ = runs
    ref = single[config]
    # Norms: each computed once, by the module's owner rank; together they cover every module.
    norms = {**ranks[0][config]["norms"], **ranks[1][config]["norms"]}
    assert ranks[0][config]["norms"].keys().isdisjoint(ranks[1][config]["norms"])
    assert norms.keys() == ref["norms"].keys()
    worst = max(float(((norms[n] - v).abs() / v.abs().clamp(min=1e-30)).max())
                for n, v in ref["norms"].items())
    assert worst < 1e-12
    for result in ranks:
        got = result[config]
        assert got["ranks"] == (WORLD, WORLD)
        assert got["das_tokens"] == ref["das_tokens"]  # all ranks' tokens, not one rank's
        assert got["amia"] == ref["amia"]  # tokens selected and seen per layer and modality
        for name, (score, assigned) in ref["das"].items():
            assert got["das"][name][1] == assigned, name
            assert abs(got["das"][name][0] - score) < 1e-12, name


def test_sparsegpt_reconstruction_is_data_parallel(runs):
    single, ranks, _ = runs
    ref = single[SPARSEGPT]
    for result in ranks:
        got = result[SPARSEGPT]
        assert got["samples"] == ref["samples"] and set(ref["samples"].values()) == {NUM_SAMPLES}
        # Every layer's SparseGPT loss in every rank's report: the owner's, the same on all ranks.
        assert got["losses"] == ranks[0][SPARSEGPT]["losses"] and None not in got["losses"].values()
        for name, loss in ref["losses"].items():
            assert got["losses"][name] == pytest.approx(loss, rel=1e-3, abs=1e-9), name
        assert got["amia"] == ref["amia"]
        for name, weight in ref["weights"].items():
            # Every rank writes the owner's weight: the ranks agree bit for bit.
            assert torch.equal(got["weights"][name], ranks[0][SPARSEGPT]["weights"][name]), name
            # The one-process Hessian is a float32 running mean, the ranks' a float64 sum of
            # theirs: the same up to rounding, so the reconstruction is too.
            assert (got["masks"][name] != ref["masks"][name]).float().mean() < 0.01, name
            assert torch.allclose(got["weights"][name], weight, atol=1e-3 * float(weight.abs().max())), name


def test_the_saved_checkpoint_has_the_single_process_masks(runs):
    from transformers import AutoModelForImageTextToText

    from tamp_modifier import load_report
    from tamp_modifier.text_decoder import language_linears

    single, _, out = runs
    saved = out / "saved"
    reloaded = language_linears(AutoModelForImageTextToText.from_pretrained(saved))
    for name, mask in single["tamp"]["masks"].items():
        assert torch.equal(reloaded[name].weight == 0, mask), name
    report = load_report(saved)
    assert report["das"]["ranks"] == report["amia"]["ranks"] == WORLD
    assert report["das"]["tokens"] == single["tamp"]["das_tokens"]


def test_wanda_after_das_is_refused_under_torchrun(runs):
    for result in runs[1]:
        assert "not data-parallel" in result["wanda_refused"]
        assert "AdaptiveInputActivation" in result["wanda_refused"]


def test_a_dataset_every_rank_passes_whole_is_refused(runs):
    # llm-compressor 0.14 would give each rank the first rank's share of it.
    for result in runs[1]:
        assert "ranks calibrated on the same 3 samples" in result["same_samples"]
        assert "rank_share" in result["same_samples"]


def test_rank_shares_cover_every_sample_once():
    from tamp_modifier.modifiers.distributed import share_bounds

    for n in range(1, 20):
        for world in range(1, 6):
            bounds = [share_bounds(n, r, world) for r in range(world)]
            covered = [i for start, end in bounds for i in range(start, end)]
            assert covered == list(range(n))
            assert max(e - s for s, e in bounds) - min(e - s for s, e in bounds) <= 1


def test_one_process_helpers_are_identities():
    from tamp_modifier.modifiers.distributed import (
        any_rank,
        assign_to_ranks,
        broadcast_object,
        is_distributed,
        rank_share,
        sum_across_ranks,
        union_across_ranks,
    )

    assert not is_distributed()
    t = torch.arange(5, dtype=torch.long)
    (total,) = sum_across_ranks([t])
    assert torch.equal(total, t) and total is not t and total.dtype == torch.long
    assert any_rank(True) and not any_rank(False)
    assert union_across_ranks(["b", "a", "b"]) == ["a", "b"]
    assert broadcast_object({"x": 1}) == {"x": 1}
    assert assign_to_ranks(["a", "b"], [1, 2]) == {"a": 0, "b": 0}
    data = list(range(7))
    assert rank_share(data) is data


def test_one_process_results_are_computed_just_before_use():
    from tamp_modifier.modifiers.distributed import assign_to_ranks, results_from_owners

    modules = [torch.nn.Linear(4, 3), torch.nn.Linear(4, 2)]
    computed = []

    def mask(module):
        computed.append(module)
        return module.weight > 0

    owner = assign_to_ranks(modules, [m.weight.numel() for m in modules])
    for i, (module, result) in enumerate(results_from_owners(modules, owner, mask, lambda m: torch.bool)):
        assert computed == modules[: i + 1]  # one result in memory at a time
        assert module is modules[i] and torch.equal(result, module.weight > 0)
        assert not torch.is_grad_enabled()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    rank_main(Path(sys.argv[1]))
