"""No host sync inside a training step, with the default metrics on; the logged metrics are TRL's, unchanged.

On a GPU, every read of a device value by the host (`.item()`, `bool(t)`, `.tolist()`, a boolean index whose size
the host must know, ...) waits for the GPU's whole queue, so host and GPU time add up instead of overlapping.
There is no GPU here: `SyncRecorder` is the CPU stand-in. It records every op that forces such a read on a GPU,
with the Python stack it came from, and the step runs the GPU code path (padding-free rows through the flash seam
`lora_causal.model.attention.call_kernel`, a CPU stand-in for the kernel, as tests/model/test_attention.py does).
The exact per-sequence attention of the CPU reads the boundaries with `.tolist()` by design (it is the CPU's and
the fallback's path, announced once on a GPU); it is not what a GPU step runs, so it is not measured.
The GPU test at the end runs whole optimizer steps under `torch.cuda.set_sync_debug_mode`.
"""

from __future__ import annotations

import re
import sys
import traceback
from pathlib import Path

import pytest
import torch
from conftest import QA_ROWS, base_recipe, write_jsonl, write_recipe
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import TrainerCallback

from lora_causal.core.recipe_file import load_recipe
from lora_causal.data.prepare import prepare_data
from lora_causal.model.loading import attach_lora, load_base_model, load_tokenizer
from lora_causal.training.trainer import build_sft_config, build_trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from test_attention import NEW_KERNEL, _pretend_cuda, stand_in_varlen_attn  # noqa: E402

aten = torch.ops.aten
# ops whose result size or value the host needs on a GPU: each is a device->host copy and a stream sync
SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
            aten._unique.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
            aten.equal.default, aten.is_nonzero.default, aten.repeat_interleave.Tensor, aten.bincount.default}
INDEXING_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
SYNC_METHODS = {torch.Tensor.tolist, torch.Tensor.numpy}  # host copies below the dispatcher on the CPU


class SyncRecorder:
    """Records device->host syncs a GPU would make while `recording` is True: (what, Python stack) pairs."""

    def __init__(self) -> None:
        self.recording = False
        self.events: list[tuple[str, str]] = []
        self.optimizer = None  # its host-resident state (see `on_host`), once the trainer has one
        recorder = self

        class _Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
                kwargs = kwargs or {}
                if recorder.recording and not (func == aten._local_scalar_dense.default and recorder.on_host(args[0])):
                    if func in SYNC_OPS or (func == aten.repeat_interleave.Tensor and kwargs.get("output_size") is None):
                        recorder.add(str(func))
                    elif func in INDEXING_OPS and _boolean_index(args[1] if len(args) > 1 else kwargs.get("indices")):
                        recorder.add(f"{func} with a boolean index")
                return func(*args, **kwargs)

        class _Function(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
                if recorder.recording and func in SYNC_METHODS:
                    recorder.add(f"Tensor.{func.__name__}")
                return func(*args, **(kwargs or {}))

        self._modes = (_Function(), _Dispatch())

    def on_host(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor` lives in host memory on a GPU run too: torch's Adam keeps each parameter's `step` count
        on the CPU (unless capturable or fused) precisely so that reading it costs no sync."""
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it
        if optimizer is None or any(group.get("capturable") or group.get("fused") for group in optimizer.param_groups):
            return False
        return any(state.get("step") is tensor for state in optimizer.state.values())

    def add(self, what: str) -> None:
        stack = "".join(traceback.format_stack(limit=40)[:-2])
        self.events.append((what, stack))

    def __enter__(self) -> SyncRecorder:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def report(self) -> str:
        return "\n\n".join(f"--- {what} from:\n{stack}" for what, stack in self.events)


def _boolean_index(indices: object) -> bool:
    return isinstance(indices, (list, tuple)) and any(
        isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8) for index in indices)


class RecordSteps(TrainerCallback):
    """Record from a step's first micro-batch to its end (forward, backward, clipping, optimizer, the step-end
    callbacks registered before this one); the batches are fetched before, and logging comes after."""

    def __init__(self, recorder: SyncRecorder) -> None:
        self.recorder = recorder
        self.steps = 0

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001 - TrainerCallback signature
        self.recorder.optimizer = kwargs.get("optimizer")
        self.recorder.recording = True

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001 - TrainerCallback signature
        self.recorder.recording = False
        self.steps += 1


def _kernel(recorder: SyncRecorder):
    """The flash kernel's CPU stand-in; its own argument checks are the test's, not the step's."""

    def kernel(*args, **options):
        was, recorder.recording = recorder.recording, False
        try:
            return stand_in_varlen_attn(*args, **options)
        finally:
            recorder.recording = was

    return kernel


def _trainer(tmp_path: Path, model_dir: Path, train: dict, callbacks: list | None = None, evaluate: bool = False):
    data_path = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS * 4)
    sections = {"data": {"eval": {"path": str(write_jsonl(tmp_path / "eval.jsonl", QA_ROWS[:3]))}}} if evaluate else {}
    tree = base_recipe(model_dir, data_path, tmp_path / "run", train={"logging_steps": 2, **train},
                       output={"save_steps": 1000}, **sections)
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", tree))
    tokenizer = load_tokenizer(recipe.model)
    data = prepare_data(recipe.data, tokenizer, recipe.train.seed)
    model = attach_lora(load_base_model(recipe.model, recipe.quantization, recipe.train.seed), recipe.lora, 0)
    config = build_sft_config(recipe, str(tmp_path / "ckpt"), evaluate)
    return build_trainer(recipe, model, tokenizer, data, config, callbacks=callbacks)


GPU_PATH = {"padding_free": True, "gradient_accumulation": 2, "max_steps": 3}
GPU_MODEL = {"attn_implementation": "varlen"}


def _steps_syncs(tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[SyncRecorder, object]:
    recorder = SyncRecorder()
    _pretend_cuda(monkeypatch, NEW_KERNEL, _kernel(recorder))
    steps = RecordSteps(recorder)
    trainer = _trainer(tmp_path, model_dir, GPU_PATH, callbacks=[steps])
    with recorder:
        trainer.train()
    assert steps.steps == 3
    return recorder, trainer


# Syncs in the libraries' own code that lora_causal cannot remove without patching them, by the innermost frame
# outside torch: (file, function) -> why. Anything else inside a step fails the tests.
KNOWN_LIBRARY_SYNCS = {
    ("transformers/masking_utils.py", "find_packed_sequence_indices"):
        "transformers' mask preparation asks whether padding-free rows are packed (`.all()`), once per forward",
    ("transformers/masking_utils.py", "_ignore_causal_mask_sdpa"):
        "transformers' mask preparation asks whether a padded batch has padding (`.all()`), once per forward",
    ("trl/trainer/utils.py", "_fused_forward"):
        "TRL's fused head selects the supervised positions with a boolean index on Triton devices (GPU only)",
}
FRAME = re.compile(r'File "([^"]+)", line \d+, in (\S+)')


def innermost_library_frame(stack: str) -> tuple[str, str]:
    """(path, function) of the innermost frame outside torch and this file."""
    for path, function in reversed(FRAME.findall(stack)):
        if "/torch/" not in path and not path.endswith("test_step_syncs.py"):
            return path, function
    return "", ""


def unexplained(events: list[tuple[str, str]]) -> list[tuple[str, str]]:
    def known(stack: str) -> bool:
        path, function = innermost_library_frame(stack)
        return any(path.endswith(file) and function == name for file, name in KNOWN_LIBRARY_SYNCS)

    return [(what, stack) for what, stack in events if not known(stack)]


def test_no_host_sync_inside_a_training_step(tmp_path: Path, tiny_model_dir: Path, monkeypatch) -> None:
    recorder, trainer = _steps_syncs(tmp_path, tiny_model_dir, monkeypatch)
    left = unexplained(recorder.events)
    assert left == [], "\n\n".join(f"--- {what} from:\n{stack}" for what, stack in left)
    # what remains is transformers' packing check, once per forward (3 steps of 2 micro-batches)
    assert {innermost_library_frame(stack)[1] for _, stack in recorder.events} <= {"find_packed_sequence_indices"}
    assert len(recorder.events) <= 6
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all({"entropy", "mean_token_accuracy", "num_tokens"} <= set(entry) for entry in logged)


def test_the_recorder_catches_trl_stock_compute_loss(tmp_path: Path, tiny_model_dir: Path, monkeypatch) -> None:
    """TRL's own compute_loss (gather + .item() per micro-batch) is flagged, and so is a planted `.item()`."""
    from trl import SFTTrainer

    from lora_causal.training.trainer import trainer_class

    monkeypatch.setattr(trainer_class(), "compute_loss", SFTTrainer.compute_loss)
    monkeypatch.setattr(trainer_class(), "log", SFTTrainer.log)
    recorder, _ = _steps_syncs(tmp_path, tiny_model_dir, monkeypatch)
    flagged = {innermost_library_frame(stack) for _, stack in unexplained(recorder.events)}
    assert any(path.endswith("trl/trainer/sft_trainer.py") and function == "compute_loss" for path, function in flagged), \
        recorder.report()

    planted = SyncRecorder()
    with planted:
        planted.recording = True
        value = torch.ones(3).sum()
        _ = value.item()
        _ = torch.tensor([1, 2]).tolist()
        _ = torch.arange(4)[torch.arange(4) > 1]
    assert [what for what, _ in planted.events] == ["aten._local_scalar_dense.default", "Tensor.tolist",
                                                   "aten.index.Tensor with a boolean index"], planted.report()


def _history(folder: Path, model_dir: Path, train: dict) -> list[dict]:
    folder.mkdir()
    trainer = _trainer(folder, model_dir, train, evaluate=True)
    trainer.train()
    return [{key: value for key, value in entry.items() if not key.endswith(("runtime", "per_second"))}
            for entry in trainer.state.log_history]


PER_TOKEN = ("entropy", "mean_token_accuracy", "eval_entropy", "eval_mean_token_accuracy")


@pytest.mark.parametrize("padding_free", [False, True])
def test_logged_metrics_are_trls(tmp_path: Path, tiny_model_dir: Path, monkeypatch, padding_free: bool) -> None:
    """The same run with TRL's stock compute_loss and log logs the same keys and the same numbers, in training
    (a last log with the steps after the last logging step) and in evaluation (eval_ keys); entropy and accuracy
    are per supervised token over a log's micro-batches (TRL's mean of per-micro-batch means differs once a log
    covers several micro-batches, so they are compared where it covers one: logging every step, no accumulation)."""
    from trl import SFTTrainer

    from lora_causal.training.trainer import trainer_class

    train = {"padding_free": padding_free, "token_budget": False, "gradient_accumulation": 2, "max_steps": 3,
             "eval_steps": 2}
    single = {**train, "gradient_accumulation": 1, "logging_steps": 1, "eval_steps": 1}
    ours, ours_single = (_history(tmp_path / name, tiny_model_dir, setting)
                         for name, setting in (("ours", train), ("ours_single", single)))
    with monkeypatch.context() as patch:
        patch.setattr(trainer_class(), "compute_loss", SFTTrainer.compute_loss)
        patch.setattr(trainer_class(), "log", SFTTrainer.log)
        stock, stock_single = (_history(tmp_path / name, tiny_model_dir, setting)
                               for name, setting in (("stock", train), ("stock_single", single)))
    assert [{k: v for k, v in entry.items() if k not in PER_TOKEN} for entry in ours] == \
        [{k: v for k, v in entry.items() if k not in PER_TOKEN} for entry in stock]
    assert [set(entry) for entry in ours] == [set(entry) for entry in stock]
    for mine, theirs in zip(ours_single, stock_single):  # evaluation covers two batches: its per-token keys differ
        assert mine.keys() == theirs.keys()
        for key in set(mine) - {"eval_entropy", "eval_mean_token_accuracy"}:
            assert mine[key] == pytest.approx(theirs[key], rel=1e-6), key
    keys = set().union(*ours)
    assert {"entropy", "mean_token_accuracy", "num_tokens", "eval_entropy", "eval_mean_token_accuracy",
            "eval_num_tokens", "eval_loss"} <= keys, keys


def test_entropy_and_accuracy_do_not_depend_on_how_steps_are_cut(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Per supervised token: the same with micro-batches of 2 examples, one budget pack per step, or a budget
    that cuts a step into more packs than it has examples (filler micro-batches)."""
    train = {"padding_free": True, "gradient_accumulation": 3, "max_steps": 3, "eval_steps": 2}
    runs = [_history(tmp_path / name, tiny_model_dir, {**train, "token_budget": budget})
            for name, budget in (("plain", False), ("one_pack", 1024), ("tight", 64))]
    logged = [[entry for entry in run if "loss" in entry or "eval_loss" in entry] for run in runs]
    assert len(logged[0]) >= 2
    for other in logged[1:]:
        assert len(other) == len(logged[0])
        for a, b in zip(logged[0], other):
            assert a.keys() == b.keys()
            for key in set(a) & {"loss", "entropy", "mean_token_accuracy", "eval_loss", "eval_entropy",
                                 "eval_mean_token_accuracy"}:
                assert a[key] == pytest.approx(b[key], rel=1e-4), key


@pytest.mark.gpu
def test_no_sync_in_whole_optimizer_steps_on_a_gpu(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Whole optimizer steps (default metrics on, padding-free rows, the real Flash kernel) under
    `torch.cuda.set_sync_debug_mode`: every sync warns, with its Python stack recorded; only the libraries' known
    ones (KNOWN_LIBRARY_SYNCS) may remain. "warn", not "error": those known ones must not stop the step.
    Syncs in backward surface when backward returns, so their innermost frame is the backward call; the backward
    of TRL's boolean index (a masked select) is the one expected there."""
    import warnings

    events: list[tuple[str, str]] = []

    class Watch(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            torch.cuda.set_sync_debug_mode("default")

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001, ARG001
        if "synchronizing" in str(message):
            events.append((str(message), "".join(traceback.format_stack(limit=40)[:-1])))

    trainer = _trainer(tmp_path, tiny_model_dir, {**GPU_PATH, "logging_steps": 100}, callbacks=[Watch()])
    assert trainer.args.bf16 and trainer.args.accelerator_config.non_blocking
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        try:
            trainer.train()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    backward = [stack for _, stack in unexplained(events) if innermost_library_frame(stack)[1] == "backward"]
    left = [(what, stack) for what, stack in unexplained(events) if stack not in backward]
    assert left == [], "\n\n".join(f"--- {what} from:\n{stack}" for what, stack in left)
    assert len(backward) <= 2 * 6, "\n\n".join(backward)  # the fused head's selection, backward, per micro-batch
