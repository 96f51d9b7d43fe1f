"""Faults a training run must survive or report plainly (issue 17, findings 8, 9, 10, 12): a diverged last step,
two runs on one output directory, data changed under a resumed run, damaged checkpoints and a full disk.

Most tests drive `engine.train` with a 5-weight linear model, which writes real accelerate checkpoints in a
fraction of a second; the findings that concern a command (`sft`, `dpo`, `kto`) run it on the tiny random model."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
import torch

from alignkit.algorithms import sft
from alignkit.algorithms.dpo import run_dpo
from alignkit.algorithms.kto import run_kto
from alignkit.algorithms.sft import run_sft
from alignkit.commands import COMMANDS, load_target
from alignkit.data.builtin import BUILTIN
from alignkit.engine import DATA_OPTIONS, EngineConfig, RunResult, Shuffled, input_digests, train
from alignkit.errors import AlignkitError
from alignkit.io import LOCK_NAME, write_json
from alignkit.reference import reference_cache
from conftest import write_jsonl
from test_dpo import config as dpo_config
from test_kto import config as kto_config
from test_sft import tiny_config


@dataclass
class ToyBatch:
    x: torch.Tensor

    @property
    def n_tokens(self) -> int:
        return len(self.x)

    def to(self, device: torch.device) -> ToyBatch:
        return ToyBatch(self.x.to(device))


class SquaredOutput:
    """The loss (w·x + b)² summed over the batch: any optimiser step changes it."""

    def units(self, batch: ToyBatch) -> int:
        return len(batch.x)

    def __call__(self, model: torch.nn.Module, batch: ToyBatch) -> tuple[torch.Tensor, dict]:
        return (model(batch.x) ** 2).sum(), {}


@dataclass
class ToyConfig(EngineConfig):
    data: str = ""
    """a data file the toy run names (and so hashes), though it trains on random points"""


class Stop(Exception):
    """Ends a toy run after a given step, as a kill would, but in-process."""


def toy_run(output: Path, *, stop_after: int = 0, poison_at: int = 0, **overrides) -> RunResult:
    """4 steps of AdamW on a linear model, checkpointed every step; `stop_after` N ends the run after step N (its
    checkpoint not yet written), `poison_at` N sets a weight to inf after step N, as a diverged update would."""
    settings = dict(output=str(output), max_steps=4, batch_size=2, lr=0.1, warmup_ratio=0.0, save_every=1,
                    keep_checkpoints=2, progress=False)  # fmt: skip
    config = ToyConfig(**{**settings, **overrides})
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    points = list(torch.randn(8, 4, generator=torch.Generator().manual_seed(0)))
    stream = Shuffled(points, 2, lambda chunk: ToyBatch(torch.stack(chunk)), seed=0)

    def on_step(done: int, total: int) -> None:
        if done and done == poison_at:
            with torch.no_grad():
                model.weight[0, 0] = float("inf")
        if done and done == stop_after:
            raise Stop

    def save_final(trained: torch.nn.Module, out: Path) -> None:
        torch.save(trained.state_dict(), out / "model.pt")

    return train(algorithm="toy", config=config, full_config=config, model=model, loss_fn=SquaredOutput(),
                 stream=stream, save_final=save_final, on_step=on_step)  # fmt: skip



def checkpoint_steps(output: Path) -> list[str]:
    return sorted(p.name for p in (output / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> RunResult:
    return toy_run(tmp_path_factory.mktemp("straight") / "out")


# Finding 8: a diverged last step was saved as a finished model of inf weights, rc 0, "model saved".


def test_sft_whose_last_step_diverges_saves_nothing_and_says_so(tmp_path):
    config = tiny_config(tmp_path, max_steps=1, lr=1e38, eval_fraction=0.0)
    with pytest.raises(AlignkitError) as caught:
        run_sft(config)
    message = caught.value.render()
    assert "inf or NaN after the last step" in message and config.output in message
    assert "no checkpoint was kept" in message
    out = Path(config.output)
    assert not (out / "model").exists() and not (out / "summary.json").exists()


@pytest.mark.parametrize("poison_at, written", [(4, "step-0000003"), (2, "step-0000001")])
def test_a_diverged_step_names_the_last_good_checkpoint_and_saves_nothing(tmp_path, poison_at, written):
    out = tmp_path / "out"
    with pytest.raises(AlignkitError) as caught:
        toy_run(out, poison_at=poison_at)
    message = caught.value.render()
    assert f"the last good checkpoint is {out / 'checkpoints' / written}" in message
    assert checkpoint_steps(out)[-1] == written  # the poisoned step's checkpoint (step 2) was not written
    assert not (out / "model.pt").exists() and not (out / "summary.json").exists()


# Finding 9: a second run on the same --output "resumed" from the first one's checkpoint while it trained.


@contextlib.contextmanager
def locked_by_another_process(out: Path) -> Iterator[int]:
    """`out` locked by another process (its pid is given) for the block, which ends it with kill -9."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from alignkit.io import output_lock\n"
         f"with output_lock(Path({str(out)!r})):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)


def test_a_second_run_on_a_locked_output_refuses_at_once_and_a_killed_holder_blocks_nothing(tmp_path):
    out = tmp_path / "out"
    with locked_by_another_process(out) as pid:
        with pytest.raises(AlignkitError) as caught:
            toy_run(out)
        assert "another run is using this output directory" in caught.value.what
        assert f"pid {pid}" in caught.value.what and caught.value.where == str(out)
        assert not (out / "run.json").exists()  # refused before touching anything
    assert (out / LOCK_NAME).exists()  # what kill -9 leaves behind
    assert toy_run(out).status == "complete"


def test_a_command_on_a_locked_output_refuses_before_loading_data_or_model(tmp_path, monkeypatch):
    # Before: sft loaded the tokenizer, the data and the model, and was refused only when train() took the lock.
    def loaded(*args, **kwargs):
        pytest.fail("loaded the tokenizer before taking the lock")

    monkeypatch.setattr(sft, "load_tokenizer", loaded)
    config = tiny_config(tmp_path)
    with locked_by_another_process(Path(config.output)) as pid:
        with pytest.raises(AlignkitError, match=f"another run is using this output directory \\(pid {pid} "):
            sft.run_sft(config)


# Finding 10: data replaced between kill and resume was trained on without a word.


def test_resume_on_changed_data_is_refused_naming_the_file_unless_resume_anyway(tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", [{"text": "one"}])
    out = tmp_path / "out"
    with pytest.raises(Stop):
        toy_run(out, data=str(data), stop_after=3)
    inputs = json.loads((out / "run.json").read_text())["inputs"]
    assert inputs[str(data)]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()

    os.utime(data, ns=(1, 1))  # touched, not changed: the hash decides
    with pytest.raises(Stop):
        toy_run(out, data=str(data), stop_after=3)
    write_jsonl(data, [{"text": "two"}])
    with pytest.raises(AlignkitError) as caught:
        toy_run(out, data=str(data))
    assert "the data changed since this run began" in caught.value.what and str(data) in caught.value.what
    assert "--resume-anyway" in caught.value.fix and "--overwrite" in caught.value.fix
    result = toy_run(out, data=str(data), resume_anyway=True)
    assert result.resumed_from == 2 and f"resuming on changed data (--resume-anyway): {data}" in capsys.readouterr().out


def test_builtin_sources_are_hashed_as_their_file_and_hub_names_are_not_files():
    name = next(iter(BUILTIN))
    config = tiny_config(Path("unused"), data=f"builtin:{name}", eval_data="some-org/some-dataset")
    digests = input_digests(config, {})
    assert list(digests) == [f"builtin:{name}"]
    assert digests[f"builtin:{name}"]["sha256"] == hashlib.sha256(BUILTIN[name].path.read_bytes()).hexdigest()


def test_every_option_that_names_training_data_is_hashed():
    named = set()
    for spec in COMMANDS.values():
        config_class = load_target(spec.target)[0]
        if isinstance(config_class, type) and issubclass(config_class, EngineConfig):
            paths = (f for f in fields(config_class) if isinstance(f.default, str))
            named |= {f.name for f in paths if f.name.endswith(("data", "prompts"))}
    assert named <= set(DATA_OPTIONS), named - set(DATA_OPTIONS)


def test_dpo_overwrite_on_other_data_replaces_the_old_reference_cache(tmp_path):
    def pairs(op: str, answer) -> Path:
        rows = [{"prompt": f"{i} {op} {i}?", "chosen": f"{answer(i)}.", "rejected": "no."} for i in range(8)]
        return write_jsonl(tmp_path / f"{answer.__name__}.jsonl", rows)

    def doubled(i: int) -> int:
        return i + i

    def squared(i: int) -> int:
        return i * i

    settings = dict(max_steps=1, batch_size=4, eval_fraction=0.0)
    run_dpo(dpo_config(tmp_path, pairs("+", doubled), **settings))
    # Before: "the reference cache was made for another data" although --overwrite starts afresh.
    assert run_dpo(dpo_config(tmp_path, pairs("*", squared), overwrite=True, **settings))["steps"] == 1


def test_kto_overwrite_replaces_the_old_reference_cache_but_never_a_given_one(tmp_path):
    def labelled(name: str, completion: str) -> Path:
        rows = [{"prompt": f"{i} plus {i}?", "completion": completion.format(i), "label": i % 2 == 0} for i in range(8)]
        return write_jsonl(tmp_path / f"{name}.jsonl", rows)

    settings = dict(max_steps=1, batch_size=4, eval_fraction=0.0)
    run_kto(kto_config(tmp_path, labelled("first", "{}."), **settings))
    # Before: kto --overwrite kept the old cache and refused it as "made for another data".
    assert run_kto(kto_config(tmp_path, labelled("second", "It is {}."), overwrite=True, **settings))["steps"] == 1

    mine = tmp_path / "mine.pt"
    mine.write_bytes(b"the user's own cache")
    assert reference_cache(tmp_path / "out", str(mine), overwrite=True) == mine and mine.exists()


# Finding 12: a damaged latest checkpoint was fatal, and a full disk gave "[enforce fail at inline_container…]",
# left a .tmp-step-* directory, or failed at the final save.


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage",
    [lambda c: truncate(c / "optimizer.bin"), lambda c: truncate(c / "pytorch_model.bin"),
     lambda c: (c / "trainer_state.json").write_text('{"step": 3, "tok')],
    ids=["optimizer.bin", "pytorch_model.bin", "trainer_state.json"],
)  # fmt: skip
def test_a_damaged_latest_checkpoint_falls_back_to_the_intact_one_before_it(tmp_path, straight, damage, capsys):
    out = tmp_path / "out"
    with pytest.raises(Stop):
        toy_run(out, stop_after=4)
    assert checkpoint_steps(out) == ["step-0000002", "step-0000003"]
    damage(out / "checkpoints" / "step-0000003")
    result = toy_run(out)
    warning = capsys.readouterr().out
    assert f"checkpoint {out / 'checkpoints' / 'step-0000003'} is damaged" in warning
    assert result.resumed_from == 2 and result.final_loss == pytest.approx(straight.final_loss, abs=1e-6)


def test_a_checkpoint_from_before_manifests_still_resumes(tmp_path, straight):
    out = tmp_path / "out"
    with pytest.raises(Stop):
        toy_run(out, stop_after=4)
    (out / "checkpoints" / "step-0000003" / "manifest.json").unlink()
    result = toy_run(out)
    assert result.resumed_from == 3 and result.final_loss == pytest.approx(straight.final_loss, abs=1e-6)


def test_no_intact_checkpoint_is_a_clear_error(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(Stop):
        toy_run(out, stop_after=3, keep_checkpoints=1)
    truncate(out / "checkpoints" / "step-0000002" / "optimizer.bin")
    with pytest.raises(AlignkitError) as caught:
        toy_run(out)
    assert "no intact checkpoint" in caught.value.what and "step-0000002: optimizer.bin has" in caught.value.what
    assert "--overwrite" in caught.value.fix


@pytest.mark.parametrize(
    "failure",
    [OSError(errno.ENOSPC, "No space left on device"),
     RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: "
                  "file write failed")],
    ids=["ENOSPC", "torch-zip-writer"],
)  # fmt: skip
def test_a_full_disk_mid_checkpoint_is_reported_and_leaves_no_partial_directory(tmp_path, monkeypatch, failure):
    out = tmp_path / "out"
    real_save = torch.save

    def save_until_step_3(obj, target, *args, **kwargs):
        real_save(obj, target, *args, **kwargs)
        if ".tmp-step-0000003" in str(target):
            raise failure  # after a file of the checkpoint is written: a partial directory

    monkeypatch.setattr(torch, "save", save_until_step_3)
    with pytest.raises(AlignkitError) as caught:
        toy_run(out)
    assert caught.value.what.startswith("the disk is full")
    assert f"it resumes from {out / 'checkpoints' / 'step-0000002'}" in caught.value.fix
    assert checkpoint_steps(out) == ["step-0000001", "step-0000002"]  # no .tmp-step-0000003
    assert not list(out.glob("*.tmp"))


@pytest.mark.parametrize("command", ["dpo", "kto"])
def test_a_full_disk_while_the_reference_cache_is_written_is_reported(tmp_path, monkeypatch, command):
    # Before: "internal error: OSError: [Errno 28] No space left on device".
    real_save = torch.save

    def no_space_for_the_cache(obj, target, *args, **kwargs):
        if "reference_logps" in str(target):
            Path(target).write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, target, *args, **kwargs)

    monkeypatch.setattr(torch, "save", no_space_for_the_cache)
    rows = [{"prompt": f"{i} plus {i}?", "chosen": f"{i + i}.", "rejected": "no."} for i in range(8)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    config = (dpo_config if command == "dpo" else kto_config)(tmp_path, data, max_steps=1, batch_size=4, eval_fraction=0.0)
    with pytest.raises(AlignkitError) as caught:
        (run_dpo if command == "dpo" else run_kto)(config)
    out = Path(config.output)
    assert caught.value.what.startswith("the disk is full") and caught.value.where == str(out)
    assert "no checkpoint was kept" in caught.value.fix
    assert not list(out.glob("reference_logps*"))  # neither the cache nor its temporary file


def test_a_full_disk_at_the_final_save_keeps_the_checkpoints(tmp_path):
    out = tmp_path / "out"
    config = ToyConfig(output=str(out), max_steps=2, batch_size=2, save_every=1, progress=False)
    points = list(torch.randn(4, 4))

    def no_space(model: torch.nn.Module, out: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(AlignkitError) as caught:
        train(algorithm="toy", config=config, full_config=config, model=torch.nn.Linear(4, 1), loss_fn=SquaredOutput(),
              stream=Shuffled(points, 2, lambda c: ToyBatch(torch.stack(c)), 0), save_final=no_space)  # fmt: skip
    assert "the disk is full" in caught.value.what and "step-0000001" in caught.value.fix
    assert not (out / "summary.json").exists()


def test_too_little_free_space_is_refused_before_training_and_before_each_checkpoint(tmp_path, monkeypatch):
    import shutil

    real_usage = shutil.disk_usage
    out = tmp_path / "out"

    def usage(path):
        # Plenty until the first checkpoint is written, then 1 KiB.
        free = 1024 if (out / "checkpoints" / "step-0000001").exists() else 10**12
        return real_usage(path)._replace(free=free)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    with pytest.raises(AlignkitError) as caught:
        toy_run(out)
    assert "not enough disk space for checkpoint step 2" in caught.value.what
    assert checkpoint_steps(out) == ["step-0000001"]

    elsewhere = tmp_path / "elsewhere"
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(free=0))
    with pytest.raises(AlignkitError) as caught:
        toy_run(elsewhere)
    assert "not enough disk space for the final model" in caught.value.what
    assert not (elsewhere / "metrics.jsonl").exists()  # refused before the first step


def test_write_json_leaves_no_temporary_file_when_the_disk_is_full(tmp_path, monkeypatch):
    target = tmp_path / "run.json"

    def half_then_full(self, text, *args, **kwargs):
        Path.write_bytes(self, text[: len(text) // 2].encode())
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_full)
    with pytest.raises(OSError):
        write_json(target, {"step": 1})
    assert not list(tmp_path.glob("run.json*"))
