"""The run-level decisions as pure functions: when a baseline is trained, negative transfer, what auto keeps."""

from __future__ import annotations

from unittest.mock import sentinel

from headstart.fit import FitResult
from headstart.strategies import Trained, keep, needs_baseline, negative_transfer


def trained(strategy: str, val_accuracy: float) -> Trained:
    result = FitResult(
        history=[{"epoch": 1, "val_accuracy": val_accuracy, "val_loss": 1 - val_accuracy}], best_epoch=1, seconds=0.0
    )
    return Trained(strategy, sentinel.net, "block2", result)


def test_a_baseline_is_trained_when_asked_or_auto_unless_the_run_is_scratch() -> None:
    assert needs_baseline("frozen", baseline=True, chosen="frozen")
    assert needs_baseline("auto", baseline=False, chosen="finetune")
    assert not needs_baseline("frozen", baseline=False, chosen="frozen")
    assert not needs_baseline("auto", baseline=True, chosen="scratch")


def test_negative_transfer_is_scratch_scoring_higher_on_validation() -> None:
    assert negative_transfer(0.80, 0.81)
    assert not negative_transfer(0.81, 0.81), "a tie is not negative transfer"


def test_auto_keeps_scratch_only_when_it_won_and_a_fixed_strategy_keeps_itself() -> None:
    transfer, scratch = trained("frozen", 0.70), trained("scratch", 0.90)
    auto = keep(transfer, scratch, auto=True)
    assert auto.kept is scratch and auto.negative_transfer and auto.transfer_val_accuracy == 0.70
    fixed = keep(transfer, scratch, auto=False)
    assert fixed.kept is transfer and fixed.negative_transfer
    better = keep(trained("frozen", 0.95), scratch, auto=True)
    assert better.kept.strategy == "frozen" and better.negative_transfer is False
    alone = keep(transfer, None, auto=False)
    assert alone.kept is transfer and alone.baseline is None and alone.negative_transfer is None


def test_sources_are_ranked_by_their_best_cuts_probe_then_similarity() -> None:
    from flows.choose import rank_sources, ranking_text

    def advice(best: str, accuracy: float, similarity: float, strategy: str) -> dict:
        cuts = {best: {"val_accuracy": accuracy}, "other": {"val_accuracy": accuracy - 0.1}}
        return {"ranking": [best, "other"], "cuts": cuts, "similarity": similarity,
                "recommendation": {"strategy": strategy}}  # fmt: skip

    rows = rank_sources({
        "imagenet": advice("features_13", 0.91, 0.40, "partial"),
        "fmnist": advice("block2", 0.93, 0.70, "frozen"),
        "resnet": advice("penultimate", 0.91, 0.55, "frozen"),
    })  # fmt: skip
    assert [(r["source"], r["cut"]) for r in rows] == [("fmnist", "block2"), ("resnet", "penultimate"),
                                                      ("imagenet", "features_13")]  # fmt: skip
    text = ranking_text(rows)
    assert text.splitlines()[3].split() == ["1", "fmnist", "block2", "93.00%", "0.70", "frozen"]
    assert text.endswith("transfer from fmnist at block2")
