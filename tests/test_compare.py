"""`qwenmoe-gb compare` at a tiny size: report columns, shared init and data order, arm validation."""

import json

import pytest

from modeling_qwenmoe_gb.compare import compare

from .card_checks import assert_card

TINY = [
    "--max_steps", "3",
    "--logging_steps", "1",
    "--synthetic_docs", "40",
    "--seq_len", "64",
    "--eval_max_sequences", "4",
    "--per_device_train_batch_size", "4",
    "--use_cpu", "true",
    "--config_overrides", '{"num_hidden_layers": 2}',
]  # fmt: skip


def test_compare_two_arms_writes_the_report(tmp_path):
    out = tmp_path / "cmp"
    summary = compare(["--out", str(out), "--arms", "micro,global", "--seeds", "0,1", *TINY])
    report = (out / "report.md").read_text()
    for column in ("avg PPL", "Δ vs micro", "PPL arithmetic", "PPL code", "spec. KL", "max expert freq",
                   "MaxVio global", "MaxVio micro"):  # fmt: skip
        assert column in report, column
    assert "| micro | 2 |" in report and "| global | 4 |" in report
    for name in ("ppl_vs_balance_bsz.png", "heatmaps_micro_vs_global.png", "curves.png", "summary.json"):
        assert (out / name).is_file(), name
    assert summary["micro"]["delta_vs_micro"] == [0.0, 0.0]
    assert len(summary["global"]["avg_ppl"]) == 2
    first_ce, first_loss = {}, {}
    for arm in ("micro", "global"):
        for seed in (0, 1):
            history = json.loads((out / arm / f"seed{seed}" / "log_history.json").read_text())["log_history"]
            first_ce[arm, seed], first_loss[arm, seed] = history[0]["ce_loss"], history[0]["loss"]
    for arm in ("micro", "global"):  # each arm's card, through the same writer as every card
        arm_dir = out / arm / "seed0"
        assert_card(arm_dir, json.loads((arm_dir / "eval.json").read_text()))
    assert first_ce["micro", 0] == first_ce["global", 0]  # same init, same first batch
    assert first_ce["micro", 1] == first_ce["global", 1]
    assert first_ce["micro", 0] != first_ce["micro", 1]  # seeds differ
    # the arms differ in how they balance: on the same CE, the micro arm's loss has the LBL of each 2-sequence chunk,
    # the global arm's the LBL of the whole step
    assert first_loss["micro", 0] != first_loss["global", 0] and first_loss["micro", 1] != first_loss["global", 1]


def test_unknown_arm_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="unknown arm 'sideways'"):
        compare(["--out", str(tmp_path), "--arms", "micro,sideways", *TINY])
    assert not any(tmp_path.iterdir())


def test_routing_arms_report_the_dropped_fraction_and_group_limited_runs(tmp_path):
    out = tmp_path / "cmp"
    summary = compare(["--out", str(out), "--arms", "global,global+grouped,global+cap0.5", "--seeds", "0",
                       "--arm_n_group", "4", "--arm_topk_group", "1", *TINY])  # fmt: skip
    report = (out / "report.md").read_text()
    assert " dropped |" in report.splitlines()[6]  # the table's header row
    config = json.loads((out / "global_plus_grouped" / "seed0" / "config.json").read_text())
    assert (config["n_group"], config["topk_group"]) == (4, 1)
    assert (
        json.loads((out / "global_plus_cap0.5" / "seed0" / "config.json").read_text())["expert_capacity_factor"] == 0.5
    )
    assert summary["global+cap0.5"]["dropped_fraction"][0] > 0.2  # half the capacity a balanced router needs
    assert "dropped_fraction" not in summary["global"]
    with pytest.raises(ValueError, match="global\\+cap<f>"):
        compare(["--out", str(tmp_path / "bad"), "--arms", "global+capx", *TINY])


def test_a_rerun_keeps_finished_arms_and_overwrite_runs_them_again(tmp_path, capsys):
    out = tmp_path / "cmp"
    flags = ["--out", str(out), "--arms", "micro", "--seeds", "0", *TINY]
    compare(flags)
    model = out / "micro" / "seed0" / "model.safetensors"
    written = model.stat().st_mtime_ns
    compare(flags)  # an interrupted compare's rerun: the finished arm is kept, not trained again
    assert model.stat().st_mtime_ns == written and "finished by an earlier run, kept" in capsys.readouterr().out
    compare([*flags, "--overwrite_output_dir", "true"])
    assert model.stat().st_mtime_ns != written
