"""``fit`` end to end on the synthetic task (tests/trainer/synthetic.py), on CPU."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from storage.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint, verify
from storage.errors import CheckpointError
from tests.trainer.synthetic import tiny_config, write_task
from trainer import FitResult, fit
from trainer.config import TrainConfig
from trainer.data import prepare
from trainer.errors import ConfigError, TrainingFailed
from trainer.loop import token_losses
from trainer.model import DecoderLM

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_task(tmp_path_factory.mktemp("task") / "task.tsv")


def curve(result: FitResult) -> list[tuple[int, float, float, float]]:
    return [(m["step"], m["train_loss"], m["val_loss"], m["bleu"]) for m in result.history]


class StopAt:
    def __init__(self, step: int) -> None:
        self.step = step
        self.evals: list[int] = []

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.evals.append(step)
        if step == self.step:
            raise KeyboardInterrupt("stop")  # what SIGINT or a pruner would raise


def test_learns_the_synthetic_translation_task(task: Path, tmp_path: Path) -> None:
    # A copy of the source scores BLEU 0 (no source word is a target word) and predicting the
    # most frequent words scores < 5; BLEU > 50 needs the word-by-word alignment learnt
    # (this setup reaches ~75 in 300 steps, ~13 s).
    cfg = tiny_config(task, tmp_path / "run", **{
        "model.d_model": 128, "model.d_ff": 256, "model.dropout": 0.0, "model.drop_path": 0.0,
        "optim.lr": 2e-3, "optim.label_smoothing": 0.0, "optim.layer_lr_decay": 1.0,
        "train.tokens_per_batch": 1024, "train.grad_accum": 1, "train.max_steps": 300,
        "train.eval_every": 100, "train.eval_subset": 40, "train.eval_max_new_tokens": 30,
        "train.ema_decay": 0.99, "eval.ndd": True})
    result = fit(cfg)
    assert result.bleu > 50, result.history
    assert result.history[-1]["ndd"] < 0.3
    assert result.val_loss < result.history[0]["val_loss"]
    assert result.stopped_by == "budget" and result.steps == 300
    assert "tok:13a" in result.bleu_signature


def test_run_directory_files(task: Path, tmp_path: Path) -> None:
    cfg = tiny_config(task, tmp_path / "run", **{"eval.test": True})
    result = fit(cfg)
    out = tmp_path / "run"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [4, 8, 12]
    keys = {"step", "tokens", "train_loss", "val_loss", "bleu", "lr", "tokens_per_s",
            "elapsed_s"}
    assert all(keys <= set(m) for m in lines)
    assert lines == result.history
    saved = json.loads((out / "result.json").read_text())
    assert saved["bleu"] == result.bleu and saved["params"]["non_embedding"] > 0
    assert saved["test_bleu"] == result.test_bleu is not None  # eval.test
    assert (out / "config.yaml").read_text().startswith("name:")
    assert result.checkpoint == str(latest_checkpoint(out))
    assert result.checkpoint_sha256 and len(result.checkpoint_sha256) == 64
    with pytest.raises(ConfigError, match="train.out_dir"):  # no silent overwrite
        fit(cfg)


def test_same_seed_same_loss_curve(task: Path, tmp_path: Path) -> None:
    a = fit(tiny_config(task, tmp_path / "a"))
    b = fit(tiny_config(task, tmp_path / "b"))
    assert curve(a) == curve(b)  # bit for bit
    c = fit(tiny_config(task, tmp_path / "c", **{"train.seed": 7}))
    assert curve(c) != curve(a)


def test_interrupted_and_resumed_run_matches_uninterrupted(task: Path, tmp_path: Path) -> None:
    """Evaluating every step makes the history the step-by-step loss curve."""
    every_step = {"train.eval_every": 1, "train.eval_subset": 4, "train.eval_max_new_tokens": 4}
    full = fit(tiny_config(task, tmp_path / "full", **every_step))
    cfg = tiny_config(task, tmp_path / "cut", **every_step)
    stopper = StopAt(5)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, [stopper])
    assert load_checkpoint(latest_checkpoint(tmp_path / "cut"))["progress"]["step"] == 5
    resumed = fit(cfg, resume=True)
    assert len(full.history) == 12
    assert curve(resumed) == curve(full)
    assert resumed.best_val_loss == full.best_val_loss and resumed.tokens == full.tokens
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 13))


def test_on_step_raise_saves_then_resume_matches(task: Path, tmp_path: Path) -> None:
    class StopStep:
        def on_step(self, step: int) -> None:
            if step == 6:
                raise RuntimeError("SIGTERM")

    full = fit(tiny_config(task, tmp_path / "full"))
    cfg = tiny_config(task, tmp_path / "cut")
    with pytest.raises(RuntimeError, match="SIGTERM"):
        fit(cfg, [StopStep()])
    assert load_checkpoint(latest_checkpoint(tmp_path / "cut"))["progress"]["step"] == 6
    assert curve(fit(cfg, resume=True)) == curve(full)


def test_resume_names_a_model_key_that_differs_and_reads_old_checkpoints(
        task: Path, tmp_path: Path) -> None:
    """A checkpoint saved before ``model.rope_pairs`` existed rotated interleaved pairs: it
    resumes with ``--set model.rope_pairs=interleaved``, and the default config says so."""
    cfg = tiny_config(task, tmp_path / "run", **{"model.rope_pairs": "interleaved"})
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, [StopAt(4)])
    path = latest_checkpoint(tmp_path / "run")
    state = load_checkpoint(path)
    del state["config"]["model"]["rope_pairs"]  # as an older version saved it
    save_checkpoint(tmp_path / "run", state["progress"]["step"], state)
    default = tiny_config(task, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"model.rope_pairs is 'half' but the checkpoint .* "
                       r"has 'interleaved'; resume with --set model.rope_pairs=interleaved"):
        fit(default, resume=True)
    assert fit(cfg, resume=True).steps == cfg.train.max_steps


def test_resume_refuses_another_corpus_or_optimiser_layout(task: Path, tmp_path: Path) -> None:
    cfg = tiny_config(task, tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, [StopAt(4)])
    other = tiny_config(task, tmp_path / "run", **{"data.vocab_size": 280})
    with pytest.raises(ConfigError, match=r"checkpoint .* was trained with another tokenizer"):
        fit(other, resume=True)
    # a checkpoint from before the tokenizer's key was saved: told by its config
    path = latest_checkpoint(tmp_path / "run")
    state = load_checkpoint(path)
    del state["tokenizer_key"]
    save_checkpoint(tmp_path / "run", state["progress"]["step"], state)
    with pytest.raises(ConfigError, match=r"data.vocab_size is 280 but the checkpoint .* was "
                       r"trained with 300 .*--set data.vocab_size=300"):
        fit(other, resume=True)
    flat = tiny_config(task, tmp_path / "run", **{"optim.layer_lr_decay": 1.0})
    with pytest.raises(ConfigError, match="optimiser state .* does not fit this run's optim"):
        fit(flat, resume=True)


def test_checkpoints_without_their_manifest_are_kept(task: Path, tmp_path: Path) -> None:
    """A run directory whose manifest.json was deleted: its checkpoint files cannot be
    verified, and a start from scratch would delete them, so fit refuses both ways."""
    cfg = tiny_config(task, tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, [StopAt(4)])
    (tmp_path / "run" / "manifest.json").unlink()
    files = sorted((tmp_path / "run").glob("ckpt_*.pt"))
    for resume in (True, False):
        with pytest.raises(CheckpointError, match=r"holds checkpoint files \(ckpt_0+4.pt the "
                           r"newest of \d\) but no manifest.json listing them"):
            fit(cfg, resume=resume)
    assert sorted((tmp_path / "run").glob("ckpt_*.pt")) == files


def test_damaged_checkpoints_say_to_move_the_directory(task: Path, tmp_path: Path) -> None:
    """Every checkpoint truncated: a fresh start is not told to --resume (that would fail
    too) but to move the directory away; --resume says the same."""
    cfg = tiny_config(task, tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, [StopAt(4)])
    for path in (tmp_path / "run").glob("ckpt_*.pt"):
        path.write_bytes(path.read_bytes()[:100])
    for resume in (False, True):
        with pytest.raises(CheckpointError, match=r"verifies \(the newest, ckpt_0+4.pt, .*\): "
                           r"move the directory away"):
            fit(cfg, resume=resume)


def test_a_run_directory_in_use_is_refused(task: Path, tmp_path: Path) -> None:
    """Two runs into one out_dir would interleave checkpoints: the second is refused while
    the first holds the directory, and a run that fails before training leaves no directory
    it made."""
    from trainer.loop import _lock_run_dir

    cfg = tiny_config(task, tmp_path / "run")
    held = _lock_run_dir(tmp_path / "run")
    try:
        with pytest.raises(ConfigError, match=r"train.out_dir=.*run is in use by another run"):
            fit(cfg)
    finally:
        os.close(held)
    bad = tiny_config(task, tmp_path / "new" / "runs" / "a",
                      **{"data.path": str(tmp_path / "nope.tsv")})
    with pytest.raises(ConfigError, match="file not found"):
        fit(bad)
    assert not (tmp_path / "new").exists()  # nor its parents that it made


def test_resuming_with_another_schedule_says_so(task: Path, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    cfg = tiny_config(task, tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, [StopAt(4)])
    longer = tiny_config(task, tmp_path / "run", **{"train.max_steps": cfg.train.max_steps + 8})
    fit(longer, resume=True)
    assert "resuming with settings the checkpoint was not trained with: train.max_steps" in (
        caplog.text)


def test_a_callback_can_stop_without_a_checkpoint(task: Path, tmp_path: Path) -> None:
    class Pruned(Exception):
        checkpoint = False

    class PruneAtFirstEval:
        def on_eval(self, step: int, metrics: dict[str, float]) -> None:
            raise Pruned(f"pruned at step {step}")

    # checkpoint_every > 0: evaluations do not checkpoint by themselves
    cfg = tiny_config(task, tmp_path / "run", **{"train.checkpoint_every": 100})
    with pytest.raises(Pruned):
        fit(cfg, [PruneAtFirstEval()])
    assert latest_checkpoint(tmp_path / "run") is None


def test_ema_weights_differ_and_are_what_gets_evaluated(task: Path, tmp_path: Path) -> None:
    # fp32 (CUDA's "auto" would evaluate in bf16) so the recomputation below matches closely
    cfg = tiny_config(task, tmp_path / "run", **{"train.ema_decay": 0.9,
                                                  "train.precision": "fp32"})
    result = fit(cfg)
    state = load_checkpoint(result.checkpoint)  # type: ignore[arg-type]
    raw, ema = state["model"], state["ema"]
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)
    data = prepare(cfg.data)
    losses = {name: val_loss(cfg, data, weights) for name, weights in (("raw", raw), ("ema", ema))}
    assert result.val_loss == pytest.approx(losses["ema"], rel=1e-5)
    assert losses["raw"] != pytest.approx(losses["ema"], rel=1e-4)


def val_loss(cfg: TrainConfig, data: Any, weights: dict[str, torch.Tensor]) -> float:
    model = DecoderLM(cfg.model, data.vocab_size, data.pad_id)
    model.load_state_dict(weights)
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for b in data.batches(data.val[: cfg.train.eval_subset], cfg.train.tokens_per_batch,
                              shuffle=False, seed=0, epoch=0):
            total += float(token_losses(model(b.tokens, b.prefix_lens), b.targets, 0.0)[1])
            n += b.n_target_tokens
    return total / n


def test_early_stopping(task: Path, tmp_path: Path) -> None:
    # with a zero learning rate after warm-up nothing improves after the first evaluation
    cfg = tiny_config(task, tmp_path / "run", **{
        "optim.lr": 1e-9, "train.eval_every": 1, "train.eval_subset": 2,
        "train.eval_max_new_tokens": 2, "train.early_stopping_patience": 2,
        "train.ema_decay": 0.0, "model.dropout": 0.0, "model.drop_path": 0.0})
    result = fit(cfg)
    assert result.stopped_by == "early_stopping"
    assert result.steps == result.best_step + 2 < 12


    again = fit(cfg, resume=True)  # ended: nothing more to train
    assert again == result
    tested = fit(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, test=True)),
                 resume=True)  # the test split wanted now: evaluated, still nothing trained
    assert tested.steps == result.steps and tested.test_bleu is not None
    assert tested.history == result.history


def test_resuming_a_finished_run_trains_and_evaluates_nothing(
    task: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tiny_config(task, tmp_path / "run")
    done = fit(cfg)
    files = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}

    class Called:
        evals = 0

        def on_eval(self, step: int, metrics: dict[str, float]) -> None:
            self.evals += 1

    seen = Called()
    caplog.set_level(logging.INFO, logger="trainer.loop")
    assert fit(cfg, [seen], resume=True) == done
    assert seen.evals == 0
    assert "finished already (budget, step 12): nothing to train" in caplog.text
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == files
    # the test split wanted now, not then: it is evaluated, nothing is trained
    with_test = fit(tiny_config(task, tmp_path / "run", **{"eval.test": True}), resume=True)
    assert with_test.test_bleu is not None and with_test.steps == 12
    assert with_test.history == done.history


def test_token_budget(task: Path, tmp_path: Path) -> None:
    result = fit(tiny_config(task, tmp_path / "run", **{"train.max_tokens": 3000}))
    assert result.stopped_by == "budget" and 3000 <= result.tokens < 3000 + 2 * 512
    assert result.steps < 12 and result.history[-1]["step"] == result.steps


def test_nan_loss_raises_training_failed(task: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    forward = DecoderLM.forward
    calls = {"n": 0}

    def poisoned(self: DecoderLM, *args: Any) -> torch.Tensor:
        calls["n"] += 1
        logits = forward(self, *args)
        return logits * float("nan") if self.training and calls["n"] > 4 else logits

    monkeypatch.setattr(DecoderLM, "forward", poisoned)
    with pytest.raises(TrainingFailed) as info:
        fit(tiny_config(task, tmp_path / "run"))
    assert info.value.reason == "nan_loss" and "step 3" in str(info.value)


def test_injected_oom_halves_the_micro_batch(task: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMT_INJECT_OOM", "3")
    result = fit(tiny_config(task, tmp_path / "run", **{"train.max_steps": 6,
                                                         "train.eval_every": 3}))
    assert result.steps == 6 and result.micro_batch_tokens == 256


def test_oom_at_the_smallest_micro_batch_fails(task: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMT_INJECT_OOM", "2:99")  # every attempt of step 2
    cfg = tiny_config(task, tmp_path / "run", **{"train.min_micro_batch_tokens": 128})
    with pytest.raises(TrainingFailed) as info:
        fit(cfg)
    assert info.value.reason == "oom" and "128 tokens" in str(info.value)


def test_checkpoint_cadence(task: Path, tmp_path: Path) -> None:
    cfg = tiny_config(task, tmp_path / "run", **{"train.checkpoint_every": 3,
                                                  "train.keep_checkpoints": 10})
    fit(cfg)
    assert [c.step for c in verify(tmp_path / "run")] == [3, 6, 9, 12]  # not at evals 4, 8


@pytest.mark.parametrize("compiled", [False, True])
def test_token_losses_match_cross_entropy(compiled: bool) -> None:
    """Eager and traced by Dynamo (``aot_eager``: the traced graph without Inductor's code
    generation), F.cross_entropy's label-smoothed loss and its gradient, ignoring -100
    targets; the NLL is the unsmoothed loss."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    logits = torch.randn(3, 5, 37).mul(3).requires_grad_()
    targets = torch.randint(0, 37, (3, 5))
    targets[0, :2] = -100
    fn = torch.compile(token_losses, backend="aot_eager", fullgraph=True) if compiled \
        else token_losses
    loss, nll = fn(logits, targets, 0.1)
    loss.backward()
    ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), label_smoothing=0.1,
                          reduction="sum")
    ref_nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(nll, ref_nll)
    torch.testing.assert_close(logits.grad, ref_grad)


def test_unpadded_batches_keep_every_real_token_and_target(tmp_path: Path) -> None:
    # train.unpad: the packed positions are each row's source, <sep>, target and <eos> (no
    # padding), and the selected targets are the padded batch's, in the same order
    from trainer.loop import _to_device

    data = prepare(tiny_config(write_task(tmp_path / "task.tsv"), tmp_path / "run").data)
    for batch in list(data.batches(data.train, 512, shuffle=True, seed=0, epoch=0))[:4]:
        cpu = torch.device("cpu")
        tokens, prefix, select, targets, packed = _to_device(
            batch.tokens, batch.prefix_lens, batch.targets, cpu)
        _, _, p_select, p_targets, p = _to_device(
            batch.tokens, batch.prefix_lens, batch.targets, cpu, unpad=True)
        assert packed is None and p is not None
        assert torch.equal(p_targets, targets) and torch.equal(p[p_select], select)
        real = tokens.flatten()[p]
        assert len(p) == int(batch.prefix_lens.sum()) + batch.n_target_tokens
        assert (real != data.pad_id).all()
        assert (tokens.flatten()[~torch.isin(torch.arange(tokens.numel()), p)]
                == data.pad_id).all()


def test_decoding_cap_fits_the_corpus_targets() -> None:
    from trainer.data import Example, Split
    from trainer.loop import decode_ratio

    def split(src_len: int, tgt_len: int) -> Split:
        return Split.from_examples([Example([1] * src_len, [2] * tgt_len, "s", "t")] * 10)

    assert decode_ratio(2.0, split(20, 30)) == 2.0  # 31 <= 2 * 20 + 10: the setting stands
    assert decode_ratio(2.0, split(20, 80)) == pytest.approx(71 / 20)  # e.g. English -> Bengali
    assert decode_ratio(0.0, split(20, 80)) == 0.0  # no ratio cap asked for
